"""What every sampler shares: the denoiser interface, timestep spacing, the run record and the noise source.

A sampler never sees the network's parameterisation: it calls a *denoiser* D(x_t, t) -> (x0_hat, eps_hat),
built from the raw network call by ``make_denoiser``. Per-step coefficients are Python floats computed in
float64 from the schedule (every sample of a batch shares t), so the state tensor keeps the caller's dtype
and device and nothing is tied to CUDA.
"""

import math
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
class FromImage:
    """What an input image fixes in a sampler call, in the sampler's space (latents for an LDM).

    - ``strength`` < 1 is SDEdit (Meng et al. 2022): only the last ``round(strength * steps)`` of the visited
      timesteps run, from ``x0`` noised to the first of them, q(x_t | x0) = N(sqrt(a) x0, (1 - a) I), with x_T
      as that noise (so a seed means the same noise as without an image). 0 returns ``x0``; 1 starts from x_T
      alone and ignores ``x0``, as a sample without an image does.
    - ``keep`` (1 where ``x0`` is known, broadcastable to x) is inpainting by replacement, as LD's DDIM sampler's
      ``mask``/``x0``: before every denoiser call the known region of x_t is replaced by x0 noised to t, and the
      known region of the result is x0 exactly.
    """

    x0: Tensor
    strength: float = 1.0
    keep: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.strength) <= 1.0:
            raise ConfigError(f"image-to-image strength must be in [0, 1] (0 keeps the input, 1 ignores it), "
                              f"got {self.strength}")


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
    strength: float = 1.0  # < 1: SDEdit from an input image, on the last timesteps only

    def as_dict(self) -> dict[str, Any]:
        """Flat, loggable view: lists instead of tuples, plus the first and last timestep."""
        d = asdict(self)
        d["timesteps"] = list(self.timesteps)
        d["t_max"], d["t_min"] = (self.timesteps[0], self.timesteps[-1]) if self.timesteps else (None, None)
        return d


def make_spec(name: str, num_timesteps: int, steps: int, eta: float, spacing: Spacing,
              image: Optional[FromImage] = None) -> SamplerSpec:
    ts = tuple(reversed(timesteps(num_timesteps, steps, spacing)))
    strength = 1.0 if image is None else float(image.strength)
    if strength < 1.0:
        ts = ts[len(ts) - round(strength * steps):]  # the least noisy ones: SDEdit re-runs the end of the chain
    return SamplerSpec(name, steps, float(eta), spacing, num_timesteps, ts, strength)


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
        image: Optional[FromImage] = None,
    ) -> None:
        if x_T is not None and tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
        if image is not None and tuple(image.x0.shape) != tuple(shape):
            raise ValueError(f"the input image has shape {tuple(image.x0.shape)} in the sampler's space, "
                             f"expected {tuple(shape)}")
        if device is None:
            device = x_T.device if x_T is not None else schedule.alphas_cumprod.device
        self.spec, self.denoise_fn, self.generator, self.callback = spec, denoise_fn, generator, callback
        self.shape, self.device, self.dtype, self.progress = tuple(shape), torch.device(device), dtype, progress
        # alpha_bar at every level, as float64 Python floats (one host copy per call, not per step).
        self.alpha_bar: list[float] = schedule.alphas_cumprod.tolist()
        self.x_T = x_T.to(self.device, dtype) if x_T is not None else self.noise()
        self.image_x0 = self.keep = None
        if image is not None:
            self.image_x0 = image.x0.to(self.device, dtype)
            self.keep = None if image.keep is None else image.keep.to(self.device, dtype)
            if spec.strength < 1.0 and spec.timesteps:  # SDEdit: x0 noised to the first visited level, by x_T
                self.x_T = self.noised(self.image_x0, spec.timesteps[0], self.x_T)

    def noise(self) -> Tensor:
        return randn(self.shape, self.generator, self.device, self.dtype)

    def noised(self, x0: Tensor, t: int, noise: Tensor) -> Tensor:
        """A draw of q(x_t | x0) (Ho et al. Eq. 4) with the given standard normal ``noise``."""
        a = self.alpha_bar[t]
        return math.sqrt(a) * x0 + math.sqrt(1 - a) * noise

    def start(self) -> Optional[Tensor]:
        """The result when no step is left to run (SDEdit at strength 0): the input itself."""
        return self.image_x0 if not self.spec.timesteps else None

    def finish(self, x0: Tensor) -> Tensor:
        """The sample: x0_hat, with the known region (inpainting by replacement) put back exactly."""
        return x0 if self.keep is None else self.keep * self.image_x0 + (1 - self.keep) * x0

    def steps(self) -> Iterator[tuple[int, int, Optional[int]]]:
        """(i, t, t_next) from the noisiest level down; t_next is None at the last (smallest) timestep."""
        ts = self.spec.timesteps
        it = tqdm(range(len(ts)), desc=self.spec.name, disable=not self.progress, leave=False)
        for i in it:
            yield i, ts[i], (ts[i + 1] if i + 1 < len(ts) else None)

    def denoise(self, i: int, x: Tensor, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t as the sampler continues from it, x0_hat, eps_hat): x_t has its known region replaced first."""
        if self.keep is not None:
            x = self.keep * self.noised(self.image_x0, t, self.noise()) + (1 - self.keep) * x
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, eps = self.denoise_fn(x, t_batch)
        x0, eps = x0.to(x.dtype), eps.to(x.dtype)  # keep the state in the requested dtype whatever D returns
        if self.callback is not None:
            self.callback(i, t, x, x0)
        return x, x0, eps


def check_eta(name: str, eta: Optional[float], natural: float) -> float:
    """Samplers whose stochasticity is fixed (ddpm: 1, dpmpp_2m: 0) refuse another eta rather than ignore it."""
    if eta is None or eta == natural:
        return natural
    raise ConfigError(
        f"sampler eta={eta} is not used by {name} (it is {natural:g} by construction); "
        "leave eta unset or use ddim, whose eta interpolates between deterministic (0) and ancestral (1)"
    )
