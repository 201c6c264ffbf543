"""Classifier-free guidance (Ho & Salimans 2022): out = out_u + scale (out_c - out_u).

The combination is applied to the raw network output. For eps, x0 and v alike this equals guiding eps (or x0):
each is affine in the output with coefficients that depend only on (x_t, t), which both branches share.
"""

from typing import Callable, Union

import torch
from torch import Tensor

CondModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def cfg_model_fn(
    model_fn: CondModelFn, cond: Tensor, null_cond: Union[int, Tensor], scale: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """Turn ``model_fn(x_t, t, cond)`` into a guided ``fn(x_t, t)`` for ``make_denoiser``.

    ``cond`` holds one condition per sample (class labels (B,) or any tensor (B, ...)); ``null_cond`` is the
    null class index, or a tensor broadcastable to ``cond`` (e.g. one unconditional context (1, L, D)).
    scale 1 is the conditional model and scale 0 the unconditional one, each in a single call of batch B;
    any other scale evaluates both in ONE call on a doubled batch [cond; null].
    """
    if isinstance(null_cond, int):
        null = torch.full_like(cond, null_cond)
    else:
        null = null_cond.to(device=cond.device, dtype=cond.dtype).expand_as(cond)

    def guided(x_t: Tensor, t: Tensor) -> Tensor:
        if scale == 1:
            return model_fn(x_t, t, cond)
        if scale == 0:
            return model_fn(x_t, t, null)
        out = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null]))
        out = out.to(torch.promote_types(out.dtype, x_t.dtype))  # combine in at least x_t's precision
        out_c, out_u = out.chunk(2)
        return out_u + scale * (out_c - out_u)

    return guided


__all__ = ["CondModelFn", "cfg_model_fn"]
