"""Estimate the latent scale factor 1/std over many batches, identically on every rank.

LD sets it from the first batch on rank 0 only, so other ranks keep 1.0 (a real bug under DDP). Here every
rank encodes its own batches and the sums are all-reduced before dividing, so all ranks get the same value:
std over the union of all ranks' latents.
"""

from typing import Callable, Iterable

import torch
import torch.distributed as dist

from lightning_ldm.distributed import all_reduce, min_max_over_ranks


def latent_moments(latents: Iterable[torch.Tensor]) -> torch.Tensor:
    """(count, sum, sum of squares) in float64 over every element of every tensor."""
    moments = torch.zeros(3, dtype=torch.float64)
    for z in latents:
        z = z.detach().to(torch.float64)
        moments += torch.stack([torch.tensor(float(z.numel()), dtype=torch.float64), z.sum().cpu(),
                                z.pow(2).sum().cpu()])
    return moments


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    return all_reduce(values, dist.ReduceOp.SUM, device)  # float64 keeps the sums exact enough


def scale_from_moments(moments: torch.Tensor) -> float:
    count, total, squares = moments.tolist()
    mean = total / count
    variance = squares / count - mean * mean
    if not variance > 0:
        raise RuntimeError(f"latent variance is {variance}; cannot set the scale factor")
    return float(1.0 / variance ** 0.5)


def estimate_scale_factor(batches: Iterable, encode: Callable[[dict], torch.Tensor], num_batches: int,
                          device: torch.device) -> float:
    """1 / std of the (unscaled, posterior-sampled) latents of ``num_batches`` batches per rank."""
    def latents():
        for index, batch in enumerate(batches):
            if index >= num_batches:
                break
            yield encode(batch)

    return scale_from_moments(all_reduce_sum(latent_moments(latents()), device))


def ranks_agree(value: float, device: torch.device) -> tuple[float, float]:
    """(min, max) of ``value`` over all ranks: equal when every rank trains on the same latent scale."""
    low, high = min_max_over_ranks(torch.tensor([value], dtype=torch.float64), device)
    return float(low), float(high)
