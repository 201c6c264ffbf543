"""Exponential moving average of the trained network's weights (only that network: never the frozen first
stage, LPIPS or a discriminator).

decay_n = min(decay, (1 + n) / (10 + n)) after n updates (the warm-up of the LD/ADM code), applied once per
*optimizer* step, in one fused ``_foreach_lerp_`` over all parameters: ema <- ema + (1 - decay) (p - ema).
The update counter is a Python int kept in the module's extra state (no GPU sync per step to read it).
"""

import copy

import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "EMA":
        return self  # the averaged copy only ever evaluates

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()  # a Python float: a device tensor here would be read back (a sync)
        pairs = [(e, p.detach()) for e, p in zip(self.model.parameters(), model.parameters()) if e.is_floating_point()]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p.to(e.dtype) for e, p in pairs], weight)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
        self.num_updates += 1

    def get_extra_state(self) -> dict:
        return {"num_updates": self.num_updates, "decay": self.decay, "warmup": self.warmup}

    def set_extra_state(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
