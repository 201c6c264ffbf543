"""GPU speed-ups that leave the math unchanged: channels_last memory layout, torch.compile and CUDA graphs.

Both are decided once per fit, in the module's ``setup`` hook: after the Trainer knows its device but before the
strategy moves the model and wraps it in DDP, so DDP's gradient buckets are laid out for the final (channels_last)
parameter strides. ``nn.Module.compile`` compiles in place: parameter names, state dicts, checkpoints and exports
are the same as in eager mode.
"""

from typing import Optional

import lightning as L
import torch
from torch import nn


def training_on_gpu(trainer: L.Trainer) -> bool:
    return trainer.strategy.root_device.type == "cuda"


def resolve_compile(setting: Optional[bool], trainer: L.Trainer) -> bool:
    """``module.compile``: null (default) compiles when training on a GPU, where it wins (see experiments/benchmarks);
    on a CPU the compile time outweighs the gain for the small models one trains there."""
    return training_on_gpu(trainer) if setting is None else bool(setting)


def use_cuda_graphs(enabled: bool, trainer: L.Trainer) -> bool:
    """Whether the compiled training step replays as CUDA graphs (inductor's cudagraph trees, what
    ``torch.compile(mode="reduce-overhead")`` turns on): one launch per graph instead of one per kernel, which
    frees the host for DDP's per-gradient hooks (measured in experiments/scaling/README.md).

    Not with gradient accumulation: the backward graph's gradients live in the graphs' memory pool, and a
    parameter's first ``.grad`` would be that memory, overwritten by the next micro-batch's replay before the
    second gradient is added to it (pytorch/pytorch#169545). Not on CPUs, which have no CUDA graphs."""
    return enabled and training_on_gpu(trainer) and trainer.accumulate_grad_batches == 1


def use_channels_last(*modules: nn.Module) -> None:
    """NHWC layout: cuDNN's fastest bf16 convolutions on tensor cores take it without transposes."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def channels_last_input(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if enabled and x.ndim == 4 else x
