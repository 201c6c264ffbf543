"""The stage-2 objective as an object of its own (as EDM2's loss class): L_LDM = E_{z, y, eps, t} w(t)
|| target - net(z_t, t, tau(y)) ||^2 (paper Eq. 3), with the target eps, x0 or v (parameterization.py), an L1
option, and an optional min-SNR-gamma weight w (Hang et al. 2023). ``cond`` is the conditioner's output, passed
to the network as keywords; the conditioner has already applied its guidance dropout."""

from typing import Literal, Optional

import torch
from torch import Tensor

from lightning_ldm.conditioning.conditioner import Cond
from lightning_ldm.diffusion.parameterization import Prediction, loss_weight, target_for
from lightning_ldm.diffusion.schedules import NoiseSchedule


class DenoisingLoss:
    def __init__(self, schedule: NoiseSchedule, prediction: Prediction, loss_type: Literal["l2", "l1"] = "l2",
                 min_snr_gamma: Optional[float] = None) -> None:
        self.schedule, self.prediction, self.loss_type, self.min_snr_gamma = (
            schedule, prediction, loss_type, min_snr_gamma)

    def __call__(self, net: torch.nn.Module, z0: Tensor, cond: Cond,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """The batch mean of the weighted per-sample error; t and noise from ``generator`` (or the global RNG)."""
        n = z0.shape[0]
        t = torch.randint(0, self.schedule.num_timesteps, (n,), device=z0.device, generator=generator)
        noise = torch.randn(z0.shape, device=z0.device, dtype=z0.dtype, generator=generator)
        z_t = self.schedule.q_sample(z0, t, noise)
        output = net(z_t, t, **cond)
        target = target_for(self.prediction, z0, noise, self.schedule.alpha_bar(t))
        error = output.float() - target.float()
        per_sample = (error.abs() if self.loss_type == "l1" else error.pow(2)).mean(dim=(1, 2, 3))
        weights = loss_weight(self.prediction, self.schedule.snr(t), self.min_snr_gamma)
        return (weights * per_sample).mean()
