"""Convolutional encoder E and decoder D of the stage-1 autoencoder (paper Sec. 3.1).

E: conv_in -> per level `num_res_blocks` ResnetBlocks (+ attention where the current pixel resolution is in
`attn_resolutions`) and a Downsample between levels -> mid (Res, Attn, Res) -> GN, SiLU, conv_out.
D mirrors it with `num_res_blocks + 1` blocks per level and Upsample between levels. D's output is unbounded
(no tanh): the reconstruction loss, not a squashing nonlinearity, keeps it in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ldm.autoencoder.blocks import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample


class _Level(nn.Module):
    """One resolution level: residual blocks, each optionally followed by attention, then a resampler."""

    def __init__(self, blocks: list[ResnetBlock], attn: list[AttnBlock], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)  # empty, or one AttnBlock after every ResnetBlock
        if resample is not None:
            self.add_module(name, resample)  # "downsample" / "upsample", the key names of the LD checkpoints
        self._resample_name = name if resample is not None else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        if self._resample_name is not None:
            h = getattr(self, self._resample_name)(h)
        return h


class _Mid(nn.Module):
    """Res -> Attn -> Res at the lowest resolution."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> features (B, out_channels, H/f, W/f) with f = 2^(len(ch_mult)-1)."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        block_in, current_resolution = ch, resolution
        levels = []
        for i_level, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks, attn = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            is_last = i_level == len(ch_mult) - 1
            levels.append(_Level(blocks, attn, None if is_last else Downsample(block_in), "downsample"))
            if not is_last:
                current_resolution //= 2
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, H/f, W/f) -> image (B, out_channels, H, W)."""

    def __init__(
        self,
        *,
        out_channels: int,
        z_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        block_in = ch * ch_mult[-1]
        current_resolution = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in, dropout)
        levels: list[_Level] = []
        for i_level in reversed(range(len(ch_mult))):  # lowest resolution first; stored so up[0] is full size
            block_out = ch * ch_mult[i_level]
            blocks, attn = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            levels.insert(0, _Level(blocks, attn, Upsample(block_in) if i_level != 0 else None, "upsample"))
            if i_level != 0:
                current_resolution *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.features(z))

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """Everything but the final conv. Training compiles this part only, so that the adaptive GAN weight's
        gradients with respect to ``conv_out.weight`` (the last layer) stay a one-layer backward."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return F.silu(self.norm_out(h))
