"""Splitting an evaluation across processes and putting the pieces back together in order.

Rank r takes the contiguous block ``shard(count, r, world)`` of the sample (or image) indices; gathering the
blocks in rank order restores the single-process order exactly, so order-dependent estimates (KID's random
subsets, IS's shuffled splits) equal the single-process ones, not just their distribution. Works with any
initialised torch.distributed group (NCCL tensors on the GPU, gloo on the CPU) and is a no-op without one.
"""

from typing import Any

import torch
import torch.distributed as dist

_MAX_TRAILING_DIMS = 4


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(values: torch.Tensor, op: dist.ReduceOp, device: torch.device) -> torch.Tensor:
    """``values`` reduced over all ranks with ``op`` (unchanged without a process group), on the CPU.
    NCCL needs tensors on ``device``; gloo takes CPU ones."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.to(device if dist.get_backend() == "nccl" else torch.device("cpu"))
        dist.all_reduce(values, op=op)
    return values.cpu()


def min_max_over_ranks(values: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise (min, max) of ``values`` over all ranks, in one collective (a MIN over [v, -v])."""
    both = all_reduce(torch.cat([values, -values]), dist.ReduceOp.MIN, device)
    low, negative_high = both.chunk(2)
    return low, -negative_high


def shard(count: int, rank: int, world: int) -> range:
    """Contiguous block of range(count) for ``rank``; sizes differ by at most one."""
    return range(count * rank // world, count * (rank + 1) // world)


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) tensor in rank order, on every rank; n_r may differ (even be 0)."""
    rank, world = rank_and_world()
    if world == 1:
        return local
    device = local.device
    # Every rank learns every row count and the row shape (a rank with no rows may not know the latter).
    meta = torch.zeros(world, 1 + _MAX_TRAILING_DIMS, dtype=torch.long, device=device)
    trailing = local.shape[1:] if local.shape[0] else ()
    if len(trailing) > _MAX_TRAILING_DIMS:
        raise ValueError(f"gather_rows takes at most {_MAX_TRAILING_DIMS} dimensions after the first")
    meta[rank, 0] = local.shape[0]
    meta[rank, 1:1 + len(trailing)] = torch.tensor(trailing, dtype=torch.long)
    dist.all_reduce(meta)
    counts = meta[:, 0].tolist()
    fullest = meta[int(meta[:, 0].argmax()), 1:].tolist()
    row_shape = tuple(int(s) for s in fullest if s > 0)
    padded = torch.zeros((max(counts),) + row_shape, dtype=local.dtype, device=device)
    if local.shape[0]:
        padded[: local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:count] for piece, count in zip(pieces, counts)])


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (a float, a dict of results)."""
    _, world = rank_and_world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
