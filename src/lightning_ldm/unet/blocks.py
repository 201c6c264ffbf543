"""Convolutional blocks of the ADM / LDM UNet: the residual block and the resamplers."""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ldm.group_norm import GroupNorm

Resample = Literal["none", "up", "down"]


def group_norm(channels: int, eps: float = 1e-5) -> GroupNorm:
    """GroupNorm with ADM's 32 groups."""
    return GroupNorm(32, channels, eps=eps)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters, so the residual branch it ends starts as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def resample(x: Tensor, how: Resample) -> Tensor:
    """Parameter-free x2 resampling: nearest-neighbour up, 2x2 average down."""
    if how == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if how == "down":
        return F.avg_pool2d(x, kernel_size=2)
    return x


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 conv (conv_resample) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) if self.conv is not None else resample(x, "down")


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 conv (conv_resample).

    The conv runs as one 2x2 conv at the *input* resolution with a kernel per output phase (a, b)
    ("sub-pixel" form, same parameters and result): 16 instead of 36 multiply-adds per output
    pixel and no materialised upsampled map.
    """

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None
        # Output row 2i + a reads input rows {i-1, i} (a = 0) or {i, i+1} (a = 1): the 3 kernel rows
        # fold into 2 as below (columns alike). A buffer, so it lives on the model's device: a
        # per-call host-to-device copy would stall eager execution.
        fold = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
        self.register_buffer("fold", fold if use_conv else None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is None:
            return resample(x, "up")
        b, c, h, w = x.shape
        fold = self.fold.to(self.conv.weight.dtype)
        # kernel[a, b] = fold[a] @ W @ fold[b]^T per (out, in) channel pair: (2, 2, C, C, 2, 2)
        kernel = torch.einsum("aur,bvs,oirs->aboiuv", fold, fold, self.conv.weight).flatten(0, 2)
        y = F.conv2d(x, kernel, self.conv.bias.repeat(4), padding=1)  # (B, 4C, H+1, W+1)
        # Phase (a, b) is the window [a:a+H, b:b+W] of channel group (a, b); interleave the phases
        # straight into a channels_last output, as (B, H, a, W, b, C).
        y = y.permute(0, 2, 3, 1).unflatten(-1, (2, 2, c))
        out = y.new_empty(b, h, 2, w, 2, c)
        for i in (0, 1):
            for j in (0, 1):
                out[:, :, i, :, j] = y[:, i : i + h, j : j + w, i, j]
        return out.view(b, 2 * h, 2 * w, c).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    """ADM residual block conditioned on the (already SiLU-activated) embedding.

    h = conv(SiLU(GN(x))); h = GN(h + W e) or, with scale_shift (FiLM), GN(h) * (1 + s) + b with
    [s, b] = W e; out = skip(x) + zero_conv(dropout(SiLU(h))). With resample "up"/"down" the block
    also changes resolution (BigGAN-style, ADM's resblock_updown): both paths are resampled after
    the first norm, before any conv, so the skip stays parameter-free in resolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float = 0.0,
        scale_shift: bool = False,
        resample: Resample = "none",
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.resample = resample
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels if scale_shift else out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))
        h, x = resample(h, self.resample), resample(x, self.resample)
        h = self.conv1(h)
        e = self.emb_proj(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h
