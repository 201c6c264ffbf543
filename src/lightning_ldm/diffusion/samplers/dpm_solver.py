"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) on a discrete schedule's timesteps."""

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from lightning_ldm.diffusion.samplers.common import (
    Callback,
    FromImage,
    Denoiser,
    Run,
    SamplerSpec,
    Spacing,
    check_eta,
    make_spec,
)
from lightning_ldm.diffusion.schedules import NoiseSchedule


def sample_dpmpp_2m(
    denoise_fn: Denoiser,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    steps: int,
    eta: Optional[float] = None,
    spacing: Spacing = "trailing",
    generator: Optional[torch.Generator] = None,
    device: Union[torch.device, str, None] = None,
    dtype: torch.dtype = torch.float32,
    x_T: Optional[Tensor] = None,
    progress: bool = False,
    callback: Optional[Callback] = None,
    image: Optional[FromImage] = None,
) -> tuple[Tensor, SamplerSpec]:
    """Multistep second-order solver of the probability-flow ODE in data-prediction form.

    With alpha = sqrt(a), sigma = sqrt(1 - a), lambda = log(alpha/sigma) and h = lambda' - lambda > 0:
    x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) D, where D = x0_hat on the first step and otherwise
    D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_previous with r = h_previous/h. The step from the smallest
    timestep to the data (lambda = inf) is first order, i.e. the returned sample is x0_hat there.
    Deterministic: eta is 0 by definition and no noise is drawn after x_T.
    """
    spec = make_spec("dpmpp_2m", schedule.num_timesteps, steps, check_eta("dpmpp_2m", eta, 0.0), spacing, image)
    run = Run(spec, denoise_fn, schedule, shape, generator=generator, device=device, dtype=dtype, x_T=x_T,
              progress=progress, callback=callback, image=image)
    if run.start() is not None:
        return run.start(), spec

    def log_snr_half(a: float) -> float:
        return 0.5 * (math.log(a) - math.log1p(-a))

    x, x0_prev, h_prev = run.x_T, None, None
    for i, t, t_next in run.steps():
        x, x0, _ = run.denoise(i, x, t)
        if t_next is None:
            return run.finish(x0), spec
        a, a_next = run.alpha_bar[t], run.alpha_bar[t_next]
        h = log_snr_half(a_next) - log_snr_half(a)
        if x0_prev is None:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = math.sqrt((1 - a_next) / (1 - a)) * x - math.sqrt(a_next) * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    raise AssertionError("unreachable: a spec always has at least one timestep")
