"""What every sampler shares: the denoiser interface, timestep spacing, the run record and the noise source.

A sampler never sees the network's parameterisation: it calls a *denoiser* D(x_t, t) -> (x0_hat, eps_hat),
built from the raw network call by ``make_denoiser``. Per-step coefficients are Python floats computed in
float64 from the schedule (every sample of a batch shares t), so the state tensor keeps the caller's dtype
and device and nothing is tied to CUDA.
"""

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Literal, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_ldm.diffusion.parameterization import Prediction, to_x0_and_eps
from lightning_ldm.diffusion.schedules import NoiseSchedule
from lightning_ldm.errors import ConfigError

Spacing = Literal["leading", "trailing", "linspace"]
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
ModelFn = Callable[[Tensor, Tensor], Tensor]
Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
# callback(i, t, x_t, x0_hat): called after each of the `steps` denoiser evaluations, i counting from 0.
Callback = Callable[[int, int, Tensor, Tensor], None]


def make_denoiser(model_fn: ModelFn, schedule: NoiseSchedule, prediction: Prediction) -> Denoiser:
    """Wrap a raw network call ``model_fn(x_t, t) -> output`` into D(x_t, t) -> (x0_hat, eps_hat) in x_t's dtype."""

    def denoise(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        out = model_fn(x_t, t)
        x0, eps = to_x0_and_eps(prediction, out, x_t, schedule.alpha_bar(t, dtype=torch.float64))
        return x0.to(x_t.dtype), eps.to(x_t.dtype)

    return denoise


def timesteps(num_timesteps: int, steps: int, spacing: Spacing) -> list[int]:
    """The `steps` integer timesteps a sampler visits, in *increasing* order (samplers run them backwards).

    leading:  LD's "leading + 1": c = T // steps, t_i = i c + 1 (T=1000, 50 steps: 1, 21, ..., 981); the +1 is
              dropped only where it would run past T - 1 (steps > T/2).
    trailing: t_i = round(T - i T/steps) - 1, always includes T - 1 (999, 979, ..., 19) (Lin et al. 2024, Tab. 2;
              SGM's legacy discretisation gives the same values when steps divides T).
    linspace: round(linspace(0, T - 1, steps)), includes both 0 and T - 1.
    """
    T = num_timesteps
    if not 1 <= steps <= T:
        raise ConfigError(f"sampler steps={steps} must be between 1 and the schedule's num_timesteps={T}")
    if spacing == "leading":
        c = T // steps
        offset = min(1, T - 1 - (steps - 1) * c)
        ts = [i * c + offset for i in range(steps)]
    elif spacing == "trailing":  # round() is half-to-even, as numpy's in Lin et al.'s Table 2 definition
        ts = sorted(round(T - i * T / steps) - 1 for i in range(steps))
    elif spacing == "linspace":
        ts = [round(i * (T - 1) / (steps - 1)) for i in range(steps)] if steps > 1 else [T - 1]
    else:
        raise ConfigError(f"sampler spacing={spacing!r} is unknown; use one of leading, trailing, linspace")
    return ts


@dataclass(frozen=True)
class SamplerSpec:
    """What a sampler ran, for logging next to every result (the paper mixes eta = 0 and 1).

    ``timesteps`` are in the order visited (decreasing); the returned sample is x0_hat at timesteps[-1].
    """

    name: str
    steps: int
    eta: float
    spacing: str
    num_timesteps: int
    timesteps: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        """Flat, loggable view: lists instead of tuples, plus the first and last timestep."""
        d = asdict(self)
        d["timesteps"] = list(self.timesteps)
        d["t_max"], d["t_min"] = self.timesteps[0], self.timesteps[-1]
        return d


def make_spec(name: str, num_timesteps: int, steps: int, eta: float, spacing: Spacing) -> SamplerSpec:
    ts = timesteps(num_timesteps, steps, spacing)
    return SamplerSpec(name, steps, float(eta), spacing, num_timesteps, tuple(reversed(ts)))


def randn(
    shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Standard normal noise drawn on the generator's own device, then moved: a CPU generator gives the same
    numbers whatever device samples on; a CUDA generator avoids the host-to-device copy."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


class Run:
    """The state one sampler call shares across its steps: start point, per-step bookkeeping, denoiser calls."""

    def __init__(
        self,
        spec: SamplerSpec,
        denoise_fn: Denoiser,
        schedule: NoiseSchedule,
        shape: Sequence[int],
        *,
        generator: Optional[torch.Generator],
        device: Union[torch.device, str, None],
        dtype: torch.dtype,
        x_T: Optional[Tensor],
        progress: bool,
        callback: Optional[Callback],
    ) -> None:
        if x_T is not None and tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
        if device is None:
            device = x_T.device if x_T is not None else schedule.alphas_cumprod.device
        self.spec, self.denoise_fn, self.generator, self.callback = spec, denoise_fn, generator, callback
        self.shape, self.device, self.dtype, self.progress = tuple(shape), torch.device(device), dtype, progress
        # alpha_bar at every level, as float64 Python floats (one host copy per call, not per step).
        self.alpha_bar: list[float] = schedule.alphas_cumprod.tolist()
        self.x_T = x_T.to(self.device, dtype) if x_T is not None else self.noise()

    def noise(self) -> Tensor:
        return randn(self.shape, self.generator, self.device, self.dtype)

    def steps(self) -> Iterator[tuple[int, int, Optional[int]]]:
        """(i, t, t_next) from the noisiest level down; t_next is None at the last (smallest) timestep."""
        ts = self.spec.timesteps
        it = tqdm(range(len(ts)), desc=self.spec.name, disable=not self.progress, leave=False)
        for i in it:
            yield i, ts[i], (ts[i + 1] if i + 1 < len(ts) else None)

    def denoise(self, i: int, x: Tensor, t: int) -> tuple[Tensor, Tensor]:
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, eps = self.denoise_fn(x, t_batch)
        x0, eps = x0.to(x.dtype), eps.to(x.dtype)  # keep the state in the requested dtype whatever D returns
        if self.callback is not None:
            self.callback(i, t, x, x0)
        return x0, eps


def check_eta(name: str, eta: Optional[float], natural: float) -> float:
    """Samplers whose stochasticity is fixed (ddpm: 1, dpmpp_2m: 0) refuse another eta rather than ignore it."""
    if eta is None or eta == natural:
        return natural
    raise ConfigError(
        f"sampler eta={eta} is not used by {name} (it is {natural:g} by construction); "
        "leave eta unset or use ddim, whose eta interpolates between deterministic (0) and ancestral (1)"
    )
