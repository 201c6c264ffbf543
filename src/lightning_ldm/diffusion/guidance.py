"""Classifier-free guidance (Ho & Salimans 2022): out = out_u + scale (out_c - out_u).

The combination is applied to the raw network output. For eps, x0 and v alike this equals guiding eps (or x0):
each is affine in the output with coefficients that depend only on (x_t, t), which both branches share.
The conditions are the conditioner's outputs (``lightning_ldm.conditioning``): whatever they hold (a class
vector, caption tokens, a map), both branches run in ONE network call on a doubled batch.
"""

from typing import Callable

import torch
from torch import Tensor

from lightning_ldm.conditioning.conditioner import Cond, join_for_guidance

Network = Callable[..., Tensor]  # net(x_t, t, **cond)


def guided_model_fn(net: Network, cond: Cond, uncond: Cond, scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    """``fn(x_t, t)`` for ``make_denoiser``: scale 1 is the conditional model and scale 0 the unconditional one,
    each in a single call of batch B; any other scale evaluates [cond; uncond] in one call of batch 2B."""
    if not cond or scale == 1:
        return lambda x_t, t: net(x_t, t, **cond)
    if scale == 0:
        return lambda x_t, t: net(x_t, t, **uncond)
    joined = join_for_guidance(cond, uncond)

    def guided(x_t: Tensor, t: Tensor) -> Tensor:
        out = net(torch.cat([x_t, x_t]), torch.cat([t, t]), **joined)
        out = out.to(torch.promote_types(out.dtype, x_t.dtype))  # combine in at least x_t's precision
        out_c, out_u = out.chunk(2)
        return out_u + scale * (out_c - out_u)

    return guided


__all__ = ["guided_model_fn"]
