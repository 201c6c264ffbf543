"""The stage-1 autoencoder: encoder, KL or VQ regulariser, decoder (paper Sec. 3.1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, Optional

import torch
from torch import nn

from lightning_ldm.autoencoder.encoder_decoder import Decoder, Encoder
from lightning_ldm.autoencoder.regularizers import (
    DiagonalGaussian,
    LatentDistribution,
    PointLatent,
    VectorQuantizer,
)
from lightning_ldm.errors import ConfigError, DataError

# Constructor kwargs of the released LD first stages (256^2, ch 128, 2 res blocks). Exact parameter counts:
#   kl-f4 55,312,063   kl-f8 83,653,863   kl-f16 69,610,963   kl-f32 103,880,131
#   vq-f4 55,322,782   vq-f8 67,717,295   (VQ counts include the codebook)
_LD_COMMON = dict(ch=128, num_res_blocks=2, resolution=256, dropout=0.0)
PAPER_PRESETS: dict[str, dict] = {
    "kl-f4": dict(_LD_COMMON, regularizer="kl", z_channels=3, embed_dim=3, ch_mult=[1, 2, 4], attn_resolutions=[]),
    "kl-f8": dict(_LD_COMMON, regularizer="kl", z_channels=4, embed_dim=4, ch_mult=[1, 2, 4, 4], attn_resolutions=[]),
    "kl-f16": dict(
        _LD_COMMON, regularizer="kl", z_channels=16, embed_dim=16, ch_mult=[1, 1, 2, 2, 4], attn_resolutions=[16]
    ),
    "kl-f32": dict(
        _LD_COMMON, regularizer="kl", z_channels=64, embed_dim=64, ch_mult=[1, 1, 2, 2, 4, 4], attn_resolutions=[16, 8]
    ),
    "vq-f4": dict(
        _LD_COMMON, regularizer="vq", z_channels=3, embed_dim=3, ch_mult=[1, 2, 4], attn_resolutions=[],
        codebook_size=8192,
    ),
    "vq-f8": dict(
        _LD_COMMON, regularizer="vq", z_channels=4, embed_dim=4, ch_mult=[1, 2, 2, 4], attn_resolutions=[32],
        codebook_size=16384,
    ),
}

# Tiny first stages for 32x32 data (CIFAR-sized) that train in minutes on a CPU. One Adam step of forward,
# L1 + KL and backward at batch 16 (2 CPU threads, best of 22): kl-f2-small 0.14 s (11 GFLOP), kl-f4-small and
# vq-f4-small 0.24 s (20 GFLOP). kl-f2-small keeps 32 channels at both levels: ch_mult [1, 2] doubles the cost
# (25 GFLOP, 0.30 s), mostly in the decoder's full-resolution upsampling conv.
_SMALL_COMMON = dict(ch=32, num_res_blocks=1, resolution=32, dropout=0.0, attn_resolutions=[])
SMALL_PRESETS: dict[str, dict] = {
    "kl-f2-small": dict(_SMALL_COMMON, regularizer="kl", z_channels=4, embed_dim=4, ch_mult=[1, 1]),
    "kl-f4-small": dict(_SMALL_COMMON, regularizer="kl", z_channels=4, embed_dim=4, ch_mult=[1, 2, 2]),
    "vq-f4-small": dict(
        _SMALL_COMMON, regularizer="vq", z_channels=4, embed_dim=4, ch_mult=[1, 2, 2], codebook_size=512
    ),
}


class AutoencoderOutput(NamedTuple):
    reconstruction: torch.Tensor
    regularization_loss: torch.Tensor  # KL: sum over latent elements, mean over batch; VQ: mean-reduced loss
    log: dict[str, torch.Tensor]  # detached scalars


class Autoencoder(nn.Module):
    """Stage-1 autoencoder x -> E -> (KL posterior | VQ) -> D -> x_hat, with a downsampling factor f."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: Optional[int] = None,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        resolution: int = 256,
        z_channels: int = 3,
        embed_dim: int = 3,
        dropout: float = 0.0,
        regularizer: Literal["kl", "vq"] = "kl",
        codebook_size: int = 8192,
        commitment_beta: float = 0.25,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        ch_mult, attn_resolutions = [int(m) for m in ch_mult], [int(r) for r in attn_resolutions]
        _validate(ch, ch_mult, attn_resolutions, resolution, regularizer, dropout)
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions, resolution=resolution, z_channels=z_channels, embed_dim=embed_dim,
            dropout=dropout, regularizer=regularizer, codebook_size=codebook_size, commitment_beta=commitment_beta,
        )  # fmt: skip
        self.regularizer = regularizer
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        shared = dict(
            ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
            resolution=resolution, dropout=dropout,
        )  # fmt: skip
        is_kl = regularizer == "kl"
        # KL: the encoder predicts mean and logvar ("double_z"); VQ: just the continuous latent
        self.encoder = Encoder(in_channels=in_channels, out_channels=(2 if is_kl else 1) * z_channels, **shared)
        self.decoder = Decoder(out_channels=out_channels, z_channels=z_channels, **shared)
        self.quant_conv = nn.Conv2d((2 if is_kl else 1) * z_channels, (2 if is_kl else 1) * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        if not is_kl:
            self.quantize = VectorQuantizer(num_codes=codebook_size, code_dim=embed_dim, beta=commitment_beta)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config["ch_mult"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    def last_layer(self) -> nn.Parameter:
        """Weight of the decoder's final conv, where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> LatentDistribution:
        """Image (B, C, H, W) in [-1, 1] -> KL posterior, or (VQ) the pre-quantisation latent as a point mass."""
        self._check_input(x)
        moments = self.quant_conv(self.encoder(x))
        return DiagonalGaussian(moments) if self.regularizer == "kl" else PointLatent(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, embed_dim, H/f, W/f) -> reconstruction; VQ latents are quantised first."""
        if self.regularizer == "vq":
            z = self.quantize.straight_through(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> AutoencoderOutput:
        if self.regularizer == "vq":
            q = self.quantize(self.encode(x).mean)
            reconstruction = self.decoder(self.post_quant_conv(q.quantized))
            log = {"vq_loss": q.loss.detach(), "perplexity": q.perplexity, "codebook_usage": q.codebook_usage}
            return AutoencoderOutput(reconstruction, q.loss, log)
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        kl = posterior.kl().mean()  # LD's convention: sum over latent elements, mean over the batch
        log = {
            "kl": kl.detach(),
            "posterior_mean_abs": posterior.mean.detach().abs().mean(),
            "posterior_std": posterior.std.detach().mean(),
        }
        return AutoencoderOutput(self.decode(z), kl, log)

    def _check_input(self, x: torch.Tensor) -> None:
        f = self.downsampling_factor
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise DataError(
                f"autoencoder input has shape {tuple(x.shape)}; expected (B, {self.in_channels}, H, W): "
                f"set the model's in_channels to match the data"
            )
        h, w = x.shape[-2:]
        if h % f or w % f:
            raise DataError(
                f"image size {h}x{w} is not divisible by the autoencoder's downsampling factor f={f}: "
                f"crop or resize the data to a multiple of {f}"
            )


def _validate(
    ch: int, ch_mult: list[int], attn_resolutions: list[int], resolution: int, regularizer: str, dropout: float
) -> None:
    if regularizer not in ("kl", "vq"):
        raise ConfigError(f"regularizer={regularizer!r} is not one of 'kl', 'vq'")
    if not ch_mult or any(m < 1 for m in ch_mult):
        raise ConfigError(f"ch_mult={ch_mult} must be a non-empty list of positive integers")
    if ch % 32:
        raise ConfigError(f"ch={ch} must be a multiple of 32 (GroupNorm uses 32 groups)")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout={dropout} must lie in [0, 1)")
    reachable = [resolution // 2**i for i in range(len(ch_mult))]
    unreachable = [r for r in attn_resolutions if r not in reachable]
    if unreachable:
        raise ConfigError(
            f"attn_resolutions={attn_resolutions}: {unreachable} never occur; the pixel resolutions of this "
            f"model (resolution={resolution}, ch_mult={ch_mult}) are {reachable}"
        )
