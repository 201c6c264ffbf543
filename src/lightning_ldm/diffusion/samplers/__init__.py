"""Samplers sharing one signature: ``fn(denoise_fn, schedule, shape, *, steps, eta, spacing, generator, device,
dtype, x_T, progress, callback) -> (x0, SamplerSpec)``.

All start from x_T ~ N(0, I) (or the given x_T) at the largest visited timestep, evaluate the denoiser once
per visited timestep (``steps`` network calls in total) and return x0_hat at the smallest one. All randomness
comes from ``generator`` (drawn on its device, then moved), or torch's global RNG when it is None.
"""

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from lightning_ldm.diffusion.samplers.common import (
    SPACINGS,
    Callback,
    Denoiser,
    FromImage,
    ModelFn,
    SamplerSpec,
    Spacing,
    make_denoiser,
    make_spec,
    timesteps,
)
from lightning_ldm.diffusion.samplers.ddim import invert_ddim, sample_ddim
from lightning_ldm.diffusion.samplers.ddpm import sample_ddpm
from lightning_ldm.diffusion.samplers.dpm_solver import sample_dpmpp_2m
from lightning_ldm.diffusion.schedules import NoiseSchedule
from lightning_ldm.errors import ConfigError

SamplerName = Literal["ddpm", "ddim", "dpmpp_2m"]
SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}


@dataclass(frozen=True)
class SamplerSettings:
    """A model's own sampling settings (``module.sampling``): what its training grids use, and the default of FID,
    ``stage=evaluate`` and ``stage=sample`` when they leave a setting unset."""

    sampler: SamplerName = "dpmpp_2m"
    steps: int = 20
    eta: Optional[float] = None  # None: the sampler's own (ddim 0, ddpm 1)
    guidance_scale: float = 1.0  # classifier-free guidance; 1 is none

    @classmethod
    def from_config(cls, node: Optional[Mapping[str, Any]], key: str = "module.sampling") -> "SamplerSettings":
        node = dict(node or {})
        unknown = sorted(set(node) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"{key} has no {', '.join(unknown)}; it takes sampler, steps, eta and guidance_scale")
        settings = cls(**node)
        if settings.sampler not in SAMPLERS:
            raise ConfigError(f"{key}.sampler={settings.sampler!r} is unknown; use one of {', '.join(SAMPLERS)}")
        if int(settings.steps) < 1:
            raise ConfigError(f"{key}.steps must be at least 1, got {settings.steps}")
        return settings

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample(
    name: SamplerName,
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
    """Dispatch to ``sample_<name>``; eta=None means the sampler's own value (ddim 0, ddpm 1, dpmpp_2m 0).
    ``image``: start from an input (SDEdit) and/or keep a known region of it (``FromImage``)."""
    if name not in SAMPLERS:
        raise ConfigError(f"sampler name={name!r} is unknown; use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](
        denoise_fn, schedule, shape, steps=steps, eta=eta, spacing=spacing, generator=generator,
        device=device, dtype=dtype, x_T=x_T, progress=progress, callback=callback, image=image,
    )


__all__ = [
    "SAMPLERS",
    "SPACINGS",
    "Callback",
    "Denoiser",
    "FromImage",
    "ModelFn",
    "SamplerName",
    "SamplerSettings",
    "SamplerSpec",
    "Spacing",
    "invert_ddim",
    "make_denoiser",
    "make_spec",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "timesteps",
]
