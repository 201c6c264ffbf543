"""DDIM (Song et al. 2021) and its deterministic inversion."""

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_ldm.diffusion.samplers.common import Callback, Denoiser, FromImage, Run, SamplerSpec, Spacing, make_spec
from lightning_ldm.diffusion.schedules import NoiseSchedule
from lightning_ldm.errors import ConfigError


def sample_ddim(
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
    """DDIM, Song et al. Eq. 12, with eta (default 0) scaling the noise between deterministic and ancestral:
    x_prev = sqrt(a') x0_hat + sqrt(1 - a' - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - a')/(1 - a)) sqrt(1 - a/a').  Returns x0_hat at the smallest timestep."""
    eta = 0.0 if eta is None else float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"sampler eta={eta} must be in [0, 1] (0 = deterministic DDIM, 1 = ancestral)")
    spec = make_spec("ddim", schedule.num_timesteps, steps, eta, spacing, image)
    run = Run(spec, denoise_fn, schedule, shape, generator=generator, device=device, dtype=dtype, x_T=x_T,
              progress=progress, callback=callback, image=image)
    if run.start() is not None:
        return run.start(), spec
    x = run.x_T
    for i, t, t_next in run.steps():
        x, x0, eps = run.denoise(i, x, t)
        if t_next is None:
            return run.finish(x0), spec
        a, a_next = run.alpha_bar[t], run.alpha_bar[t_next]
        sigma = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        x = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * run.noise()
    raise AssertionError("unreachable: a spec always has at least one timestep")


def invert_ddim(
    denoise_fn: Denoiser,
    x0: Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int,
    spacing: Spacing = "trailing",
    fixed_point_iters: int = 0,
    progress: bool = False,
) -> tuple[Tensor, SamplerSpec]:
    """Run the deterministic DDIM map backwards, data -> x_T, on the timesteps ``sample_ddim`` would visit.

    Each step solves x_t = sqrt(a) x0_hat(x_t) + sqrt(1 - a) eps_hat(x_t) for x_t given the level below, by
    the fixed-point form x_t = sqrt(a/a') x' + (sqrt(1 - a) - sqrt(a (1 - a')/a')) eps_hat(x_t) (a' = 1 and
    x' = x0 for the first step). ``fixed_point_iters=0`` is the usual inversion (eps_hat taken at the level
    below, first-order error); each iteration re-evaluates eps_hat at the current estimate, so with a few
    iterations ``sample_ddim(x_T=...)`` reproduces x0 up to the fixed-point tolerance.
    """
    if fixed_point_iters < 0:
        raise ConfigError(f"fixed_point_iters={fixed_point_iters} must be >= 0")
    spec = make_spec("ddim_inversion", schedule.num_timesteps, steps, 0.0, spacing)
    alpha_bar = schedule.alphas_cumprod.tolist()
    up = spec.timesteps[::-1]
    x, a_below, t_below = x0, 1.0, up[0]  # the data level: a' = 1, eps_hat first read at the smallest t
    for t in tqdm(up, desc="ddim_inversion", disable=not progress, leave=False):
        a = alpha_bar[t]
        c_x, c_eps = math.sqrt(a / a_below), math.sqrt(1 - a) - math.sqrt(a * (1 - a_below) / a_below)
        x_eval, t_eval = x, t_below
        for _ in range(fixed_point_iters + 1):
            _, eps = denoise_fn(x_eval, torch.full((x.shape[0],), t_eval, device=x.device, dtype=torch.long))
            x_eval, t_eval = c_x * x + c_eps * eps, t
        x, a_below, t_below = x_eval, a, t
    return x, spec
