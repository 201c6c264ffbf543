"""BatchNorm over the global batch of all DDP ranks, without stopping the CPU (``trainer.sync_batchnorm=true``).

The discriminator's BatchNorm (LD's PatchGAN) must see the statistics of the whole global batch under DDP, or
each GPU's discriminator normalises with the statistics of its own slice. ``torch.nn.SyncBatchNorm`` does that,
but each layer's forward pass drops the statistics of ranks with empty inputs by boolean indexing, which waits
for the GPU (its source says so: pytorch#78549). With three BatchNorm layers and three discriminator passes per
batch, that made nine GPU syncs per stage-1 batch.

Here the per-rank statistics (mean, variance, count) are all-gathered and combined on the device, a rank with an
empty batch weighing zero (no host read); the backward pass all-reduces the sums of dL/dy and dL/dy * (x - mean),
so each rank's input gradient is that of the loss summed over all ranks, which is what BatchNorm over the
concatenated batch gives. On CUDA the per-element work runs in PyTorch's fused SyncBatchNorm kernels
(``torch.batch_norm_stats``/``_elemt``/``_backward_reduce``/``_backward_elemt``): the same math written out
as float32 autograd ops makes the synchronisation several times as costly (experiments/scaling/README.md, and
check_global_batch_norm.py there for the kernels' accuracy). Elsewhere (CPU, gloo) the same formulas run as
plain tensor ops, which tests/test_sync_batch_norm.py holds to nn.BatchNorm2d over the union of the ranks' slices.
"""

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn

from lightning_ldm.distributed import rank_and_world


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view([1, -1] + [1] * (x.dim() - 2))


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def _local_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's per-channel mean and 1/sqrt(biased variance + eps), float32."""
    if x.is_cuda:
        return torch.batch_norm_stats(x, eps)
    var, mean = torch.var_mean(x.float(), _reduce_dims(x), correction=0)
    return mean, torch.rsqrt(var + eps)


def _normalise(x, weight, bias, mean, invstd, eps) -> torch.Tensor:
    """y = (x - mean) * invstd * weight + bias, in x's dtype."""
    if x.is_cuda:
        return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
    y = (x.float() - _channel_view(mean, x)) * _channel_view(invstd, x)
    if weight is not None:
        y = y * _channel_view(weight.float(), x) + _channel_view(bias.float(), x)
    return y.to(x.dtype)


def _backward_sums(grad, x, mean, invstd, weight, needs_input, needs_weight, needs_bias):
    """sum(dL/dy), sum(dL/dy * (x - mean)) over this rank's elements, and the local weight and bias gradients."""
    if x.is_cuda:
        return torch.batch_norm_backward_reduce(grad, x, mean, invstd, weight, needs_input, needs_weight, needs_bias)
    grad32 = grad.float()
    sum_dy = grad32.sum(_reduce_dims(x))
    sum_dy_xmu = (grad32 * (x.float() - _channel_view(mean, x))).sum(_reduce_dims(x))
    return sum_dy, sum_dy_xmu, sum_dy_xmu * invstd, sum_dy


def _input_gradient(grad, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts) -> torch.Tensor:
    """dL/dx = weight * invstd * (dL/dy - sum_dy / N - (x - mean) * invstd^2 * sum_dy_xmu / N), N = sum(counts):
    the BatchNorm backward pass with global sums."""
    if x.is_cuda:
        return torch.batch_norm_backward_elemt(grad, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts)
    n = counts.sum().float()
    scale = invstd if weight is None else invstd * weight.float()
    x_mu = x.float() - _channel_view(mean, x)
    dx = (grad.float() - _channel_view(sum_dy / n, x) - x_mu * _channel_view(invstd.square() * sum_dy_xmu / n, x))
    return (dx * _channel_view(scale, x)).to(x.dtype)


def _keep_layout(t: torch.Tensor) -> torch.Tensor:
    """Channels-last stays channels-last (the fused kernels take either layout, but one that is dense)."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return t
    return t.contiguous()


class _GlobalBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, world: int):
        x = _keep_layout(x)
        channels = x.shape[1]
        # [mean, invstd, count] of this rank; zeros for an empty slice (its count weighs it out below).
        if x.numel():
            mean, invstd = _local_stats(x, eps)
            count = torch.full((1,), x.numel() // channels, dtype=torch.float32, device=x.device)
            local = torch.cat([mean.float(), invstd.float(), count])
        else:
            local = torch.zeros(2 * channels + 1, dtype=torch.float32, device=x.device)
        stats = _all_gather(local, world).view(world, 2 * channels + 1)
        means, invstds, counts = stats[:, :channels], stats[:, channels:2 * channels], stats[:, -1:]
        # Combine per-rank moments (Chan et al.'s parallel variance): N var = sum_r n_r (var_r + (mean_r - mean)^2);
        # an empty rank (n_r = 0, invstd_r = 0) contributes nothing, without a host-side mask.
        present = counts > 0
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        variances = torch.where(present, invstds.pow(-2) - eps, 0.0)  # an empty rank's inf is never picked
        var = (counts * (variances + (means - mean).square())).sum(0) / n
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd, counts.view(-1).to(torch.int32))
        y = _normalise(x, weight, bias, mean, invstd, eps) if x.numel() else torch.empty_like(x)
        ctx.mark_non_differentiable(mean, var, n)
        return y, mean, var, n

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var, _grad_n):
        x, weight, mean, invstd, counts = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_x = grad_weight = grad_bias = None
        channels = x.shape[1]
        if x.numel():
            grad_y = _keep_layout(grad_y)
            sum_dy, sum_dy_xmu, grad_weight, grad_bias = _backward_sums(
                grad_y, x, mean, invstd, weight, needs_input, needs_weight, needs_bias)
        else:  # an empty slice still joins the all-reduce below, and its parameters get zero gradients for DDP
            sum_dy = sum_dy_xmu = torch.zeros(channels, dtype=torch.float32, device=x.device)
            if weight is not None:
                grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(weight)
        if needs_input:
            # The one collective of the backward pass: every rank's input gradient depends on all ranks' dL/dy.
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums)
            sum_dy, sum_dy_xmu = sums[:channels], sums[channels:]
            if x.numel():
                weight32 = None if weight is None else weight.float()
                grad_x = _input_gradient(grad_y, x, mean, invstd, weight32, sum_dy, sum_dy_xmu, counts)
            else:
                grad_x = torch.zeros_like(x)
        # Parameter gradients stay local: DDP all-reduces them with the rest.
        return (grad_x, grad_weight if needs_weight else None, grad_bias if needs_bias else None, None, None)


def _all_gather(local: torch.Tensor, world: int) -> torch.Tensor:
    """The ranks' ``local`` vectors, concatenated in rank order (one stream-ordered collective)."""
    if dist.get_backend() == "gloo":  # gloo has no all_gather_into_tensor
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        return torch.cat(parts)
    out = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(out, local)
    return out


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """nn.BatchNorm{1,2,3}d with the same parameters and buffers; training statistics over all ranks."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        world = rank_and_world()[1]
        if not self.training or world == 1:
            return super().forward(x)
        y, mean, var, n = _GlobalBatchNormFunction.apply(x, self.weight, self.bias, self.eps, world)
        if self.track_running_stats:
            self._update_running_stats(mean, var, n)
        return y

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
