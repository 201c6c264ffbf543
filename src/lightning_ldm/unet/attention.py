"""Attention layers of the UNet: ADM self-attention and LDM's SpatialTransformer (cross-attention).

Both run on tokens (B, L = H*W, C). For a channels_last feature map that view is free, and the
(B, L, 3, heads, d) projection permuted to (B, heads, L, d) is exactly the layout flash attention
reads, so scaled_dot_product_attention never copies q/k/v nor materialises the L x L map.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import group_norm, zero_init


def to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C); a view when x is channels_last."""
    return x.flatten(2).transpose(1, 2)


def from_tokens(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W), channels_last in memory (a view)."""
    return tokens.transpose(1, 2).unflatten(2, (height, width))


def split_heads(x: Tensor, parts: int, heads: int) -> tuple[Tensor, ...]:
    """(B, L, parts * C) -> `parts` tensors (B, heads, L, C // heads), views of x."""
    return x.unflatten(-1, (parts, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x: Tensor) -> Tensor:
    """(B, heads, L, d) -> (B, L, heads * d)."""
    return x.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """ADM attention block: x + proj(softmax(q k^T / sqrt(d)) v) with q, k, v from GN(x)."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        q, k, v = split_heads(self.qkv(to_tokens(self.norm(x))), 3, self.heads)
        out = self.proj_out(merge_heads(F.scaled_dot_product_attention(q, k, v)))
        return x + from_tokens(out, height, width)


class Attention(nn.Module):
    """Multi-head attention of tokens x (B, L, dim) to themselves or to a context (B, Lc, context_dim)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        else:  # one fused projection: one GEMM instead of three
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.is_cross:
            (q,) = split_heads(self.to_q(x), 1, self.heads)
            k, v = split_heads(self.to_kv(context), 2, self.heads)
        else:
            q, k, v = split_heads(self.to_qkv(x), 3, self.heads)
        return self.to_out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class GEGLU(nn.Module):
    """Gated feed-forward: W2 (a * GELU(g)) with [a, g] = W1 x, hidden width 4 * dim (Shazeer 2020)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """LDM cross-attention layer: x + proj_out(blocks(proj_in(GN(x)))) on H*W tokens.

    proj_in / proj_out are 1x1 convolutions written as Linear layers on the tokens; proj_out is zero
    initialised so the layer starts as the identity.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int = 1) -> None:
        super().__init__()
        self.norm = group_norm(channels, eps=1e-6)  # LDM's Normalize() in attention.py (ResBlocks keep 1e-5)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        h = self.proj_in(to_tokens(self.norm(x)))
        for block in self.blocks:
            h = block(h, context)
        return x + from_tokens(self.proj_out(h), height, width)
