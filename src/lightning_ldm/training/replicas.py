"""Under DDP every rank must hold the same weights: gradients are all-reduced, and every rank then takes the same
optimizer step and the same EMA update, so the trained networks and the EMA copy stay bit-identical. A rank that
drifted (an update skipped or applied on some ranks only, weights loaded on one rank) would go on training other
weights without any error, and checkpoints and exports, written by rank 0, would hide it. This compares a float64
checksum of each network's parameters over all ranks: exact, since identical tensors reduce identically.
Buffers are left out: BatchNorm statistics differ between ranks without SyncBatchNorm, by design.
"""

import torch
from torch import nn

from lightning_ldm.distributed import min_max_over_ranks


def parameter_checksum(module: nn.Module) -> torch.Tensor:
    """(sum, sum of squares) of every floating-point parameter, in float64 on the CPU."""
    total = torch.zeros(2, dtype=torch.float64)
    sums = [torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
            for p in module.parameters() if p.is_floating_point()]
    if sums:
        total += torch.stack(sums).sum(0).cpu()
    return total


def differing_across_ranks(modules: dict[str, nn.Module], device: torch.device) -> list[str]:
    """Names of the modules whose parameters are not the same on every rank (none without a process group)."""
    sums = torch.stack([parameter_checksum(module) for module in modules.values()]).flatten()
    low, high = min_max_over_ranks(sums, device)
    differs = (low != high).view(len(modules), 2).any(1).tolist()
    return [name for name, differ in zip(modules, differs) if differ]
