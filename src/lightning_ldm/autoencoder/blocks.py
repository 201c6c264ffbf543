"""Building blocks of the stage-1 encoder and decoder (paper Sec. 3.1, App. G).

Submodule names (norm1, conv1, nin_shortcut, q, k, v, proj_out, ...) follow the layout of the released LD
first-stage checkpoints, so their state dicts map onto these modules key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ldm.group_norm import GroupNorm


def Normalize(channels: int) -> GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6, the normalisation used throughout the LD autoencoders (the
    layout-keeping form when compiled: the same change made the compiled LDM-4 UNet step 1.14-1.26x faster)."""
    return GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GN, SiLU, 3x3 conv) twice, with a 1x1 shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int | None = None, *, dropout: float = 0.0) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if self.in_channels != self.out_channels else x
        return shortcut + h


# The fused SDPA kernels (flash, cuDNN) stop at head dim 256. Beyond it PyTorch falls back to the
# memory-efficient kernel, whose backward pass at the autoencoder's single 512-channel head dominates a
# compiled training step. The same attention as float32 matmuls on TF32 tensor cores
# (float32_matmul_precision=high, the default) avoids it (A/B in experiments/benchmarks/README.md).
# TF32 loses nothing here: the bf16 q and k are exact in its 10-bit mantissa and accumulate in float32, so
# q k^T is the float32 product; the weights enter the second matmul with 10 bits where the kernel gives
# them bf16's 7.
FUSED_ATTENTION_MAX_HEAD_DIM = 256
# The written-out form keeps the (B, L, L) attention weights for the backward pass. Past this many elements
# (2 GiB in float32) the memory-efficient kernel's memory, linear in L, matters more than its speed.
WRITTEN_OUT_ATTENTION_MAX_SCORES = 2**29


def single_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(C)) v for (B, 1, L, C) tensors: SDPA's fused kernels, except when training with
    a head too wide for them (C > 256), where float32 matmuls are faster and at least as precise."""
    batch, _, length, dim = q.shape
    if (dim <= FUSED_ATTENTION_MAX_HEAD_DIM or not (torch.is_grad_enabled() and q.requires_grad)
            or batch * length * length > WRITTEN_OUT_ATTENTION_MAX_SCORES):
        # Inference (the encoder of stage 2, the decoder of sampling) keeps the kernel: only its backward pass
        # is slow (the forward took 2.2 ms per block), and it needs no (B, L, L) buffer.
        return F.scaled_dot_product_attention(q, k, v)
    with torch.autocast(q.device.type, enabled=False):
        # Scaled after the product, not before: q / sqrt(C) would no longer be exact in TF32.
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * dim**-0.5
        # The softmax written out: inductor's pattern matcher turns a .softmax between two matmuls back into
        # the SDPA call above. Subtracting the (detached) row maximum changes nothing but the exponent's range.
        weights = (scores - scores.amax(dim=-1, keepdim=True).detach()).exp()
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return torch.matmul(weights, v.float()).to(q.dtype)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions, with a residual connection
    (single_head_attention: fused kernels avoid materialising the (HW)^2 attention matrix where they apply)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1 head, HW, C)
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        out = single_head_attention(tokens(self.q(normed)), tokens(self.k(normed)), tokens(self.v(normed)))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv after padding only right and bottom by one pixel.

    The asymmetric (0, 1, 0, 1) pad keeps output pixel (i, j) aligned with input pixels 2i..2i+2, 2j..2j+2, as
    in the released LD weights; symmetric padding would shift every feature by half a pixel.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition followed by a 3x3 conv (no transposed-conv artefacts)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
