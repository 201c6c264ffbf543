"""Non-finite losses stop training, without a GPU sync every step and without a bad update reaching the weights.

Reading a loss on the host (``bool(torch.isfinite(loss))``) waits for the GPU to finish the forward pass, so the
CPU can no longer queue the next kernels ahead of it. Instead, before each optimizer step the verdict is computed
on the device and handed to the fused Adam(W) kernel as ``found_inf`` (the mechanism GradScaler uses): a step
whose gradients (or, without gradients, loss) are not finite is skipped on the GPU itself. The host reads the
verdict ``DELAY`` batches later, when the GPU has long finished that step, and only then stops the run, saving
a checkpoint that never took the non-finite update.

Under DDP the verdict comes from the all-reduced gradients, identical on every rank, and every rank reads it at
the same batch, so all ranks skip the same steps and stop together.
"""

from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

DELAY = 2  # batches between a step and the host reading its verdict: by then the GPU is done with it


@dataclass
class Verdict:
    batch: int
    name: str
    host: torch.Tensor  # [skipped, loss] copied to the host without waiting
    done: Optional[torch.cuda.Event]

    def read(self) -> tuple[bool, float]:
        if self.done is not None:
            self.done.synchronize()
        return bool(self.host[0]), float(self.host[1])


class NonFiniteGuard:
    def __init__(self) -> None:
        self._pending: deque[Verdict] = deque()

    def before_step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, name: str, batch: int,
                    gradients: bool = True) -> torch.Tensor:
        """Mark ``optimizer``'s next step to be skipped on the device if it is not finite; returns the flag (0./1.).

        ``gradients=False`` (fp16 with a GradScaler, whose scaled gradients overflow by design and which skips
        those steps itself): judge the loss only and leave ``found_inf`` to the scaler.
        """
        optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        loss = loss.detach().float()
        if grads and gradients:
            bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).float().sum())
        else:
            bad = ~torch.isfinite(loss)
        skip = bad.to(torch.float32)
        if gradients:
            if not getattr(optimizer, "_step_supports_amp_scaling", False):
                raise TypeError(f"{type(optimizer).__name__} cannot skip a step on the device; use fused=True")
            optimizer.grad_scale, optimizer.found_inf = None, skip
        values = torch.stack([skip, loss.to(skip.device)])
        if values.is_cuda:
            host = torch.empty(2, pin_memory=True)
            host.copy_(values, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = values, None
        self._pending.append(Verdict(batch, name, host, done))
        return skip

    def first_failure(self, current_batch: int, everything: bool = False) -> Optional[tuple[int, str, float]]:
        """(batch, name, loss) of the oldest skipped step at least ``DELAY`` batches old (any age if ``everything``)."""
        while self._pending and (everything or self._pending[0].batch <= current_batch - DELAY):
            verdict = self._pending.popleft()
            skipped, loss = verdict.read()
            if skipped:
                self._pending.clear()
                return verdict.batch, verdict.name, loss
        return None
