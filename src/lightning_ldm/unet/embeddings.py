"""Timestep embedding of the ADM / LDM UNet."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of timesteps t (B,): [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half).

    Always float32: bf16 spaces numbers near 1000 by 4, so phases t * f_i computed in it would be off
    by up to 2 radians; the caller casts the result.
    """
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))  # an odd dim gets one zero feature


class TimestepEmbedding(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear (ADM's `time_embed`)."""

    def __init__(self, in_features: int, embed_dim: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.linear_1 = nn.Linear(in_features, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, t: Tensor) -> Tensor:
        # Cast after the float32 sinusoids so a model converted with .to(bfloat16) (no autocast) works too.
        emb = timestep_embedding(t, self.in_features).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))
