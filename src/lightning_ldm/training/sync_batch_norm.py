"""BatchNorm over the global batch of all DDP ranks, without stopping the CPU (``trainer.sync_batchnorm=true``).

The discriminator's BatchNorm (LD's PatchGAN) must see the statistics of the whole global batch under DDP, or
each GPU's discriminator normalises with the statistics of its own slice. ``torch.nn.SyncBatchNorm`` does that,
but each layer's forward pass drops the statistics of ranks with empty inputs by boolean indexing, which waits
for the GPU (its source says so: pytorch#78549). With three BatchNorm layers and three discriminator passes per
batch, that made nine GPU syncs per stage-1 batch. Here the per-rank sums are all-reduced instead (one
stream-ordered collective per layer, no host read), with autograd through
``torch.distributed.nn.functional.all_reduce``, whose backward all-reduces the statistics' gradients: each rank's
input gradient is that of the loss summed over all ranks, which is what BatchNorm over the concatenated batch
gives. A rank with an empty batch adds zero to every sum.

Statistics in float32: mean = sum / n, biased variance = sum of squares / n - mean^2 normalises, and the running
variance takes the unbiased n / (n - 1) form, as nn.BatchNorm does.
"""

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn
from torch.distributed.nn.functional import all_reduce

from lightning_ldm.metrics.distributed import rank_and_world


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """nn.BatchNorm{1,2,3}d with the same parameters and buffers; training statistics over all ranks."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or rank_and_world()[1] == 1:
            return super().forward(x)
        channels = x.shape[1]
        reduce_dims = [d for d in range(x.dim()) if d != 1]
        x32 = x.float()
        count = torch.full((1,), x.numel() // max(channels, 1), dtype=torch.float32, device=x.device)
        local = torch.cat([x32.sum(reduce_dims), x32.square().sum(reduce_dims), count])
        total = all_reduce(local, op=dist.ReduceOp.SUM)
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels:2 * channels] / n - mean.square()).clamp_min(0.0)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x32 - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n.detach())
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # A Python float or a device tensor: never a host value read back from the GPU.
        factor = (1.0 / self.num_batches_tracked.to(self.running_mean.dtype) if self.momentum is None  # cumulative
                  else self.momentum)
        unbiased = var * n / (n - 1).clamp_min(1.0)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def to_global_batch_norm(module: nn.Module) -> nn.Module:
    """Every BatchNorm layer (and torch's SyncBatchNorm) in ``module`` replaced by GlobalBatchNorm, in place;
    parameters and buffers are the same tensors."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            replacement = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats, device="meta")
            replacement.weight, replacement.bias = child.weight, child.bias
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(replacement, buffer, getattr(child, buffer))
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            to_global_batch_norm(child)
    return module


class GlobalBatchNormSync(TorchSyncBatchNorm):
    """Lightning's layer-sync plugin for ``sync_batchnorm=true`` (a TorchSyncBatchNorm, which Lightning requires
    alongside that flag), converting to GlobalBatchNorm instead of torch's SyncBatchNorm."""

    def apply(self, model: nn.Module) -> nn.Module:
        return to_global_batch_norm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        return model  # GlobalBatchNorm is plain BatchNorm outside DDP, with the same state dict
