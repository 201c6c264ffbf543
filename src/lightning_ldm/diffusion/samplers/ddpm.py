"""DDPM ancestral sampling (Ho et al. 2020), on all T steps or a respaced subset."""

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


def sample_ddpm(
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
    """Ancestral sampling from the posterior q(x_prev | x_t, x0_hat) (Ho et al. Eqs. 6-7), variance beta_tilde.

    With steps < T the chain is respaced: between visited levels t > t' the step's beta is recomputed as
    1 - a/a' (a = alpha_bar_t, a' = alpha_bar_t'), so the skipped steps compose exactly. Returns x0_hat at
    the smallest timestep (equal to the posterior mean there when that timestep is 0). eta is 1 by definition.
    """
    spec = make_spec("ddpm", schedule.num_timesteps, steps, check_eta("ddpm", eta, 1.0), spacing, image)
    run = Run(spec, denoise_fn, schedule, shape, generator=generator, device=device, dtype=dtype, x_T=x_T,
              progress=progress, callback=callback, image=image)
    if run.start() is not None:
        return run.start(), spec
    x = run.x_T
    for i, t, t_next in run.steps():
        x, x0, _ = run.denoise(i, x, t)
        if t_next is None:
            return run.finish(x0), spec
        a, a_next = run.alpha_bar[t], run.alpha_bar[t_next]
        beta = 1 - a / a_next
        # Posterior mean (Eq. 7): sqrt(a') beta/(1 - a) x0 + sqrt(1 - beta) (1 - a')/(1 - a) x_t.
        mean = (math.sqrt(a_next) * beta / (1 - a)) * x0 + (math.sqrt(1 - beta) * (1 - a_next) / (1 - a)) * x
        beta_tilde = (1 - a_next) / (1 - a) * beta
        x = mean + math.sqrt(beta_tilde) * run.noise()
    raise AssertionError("unreachable: a spec always has at least one timestep")
