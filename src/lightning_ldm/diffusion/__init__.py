"""Diffusion mathematics for stage 2: schedules, parameterisations, loss weights, samplers and guidance.

Pure functions and a buffer-only module; no network lives here (the module and checkpoints aside). Typical wiring:

    schedule = NoiseSchedule(kind="scaled_linear")
    cond, uncond = conditioner.guidance_inputs({"class": labels}, device)
    denoise = make_denoiser(guided_model_fn(unet, cond, uncond, 1.5), schedule, "eps")
    x0, spec = sample("ddim", denoise, schedule, (B, C, H, W), steps=50, generator=g)
"""

from lightning_ldm.diffusion.guidance import guided_model_fn
from lightning_ldm.diffusion.parameterization import (
    PREDICTIONS,
    Prediction,
    loss_weight,
    target_for,
    to_x0_and_eps,
)
from lightning_ldm.diffusion.samplers import (
    SAMPLERS,
    SamplerName,
    SamplerSpec,
    invert_ddim,
    make_denoiser,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    timesteps,
)
from lightning_ldm.diffusion.schedules import NoiseSchedule, ScheduleKind

__all__ = [
    "PREDICTIONS",
    "SAMPLERS",
    "NoiseSchedule",
    "Prediction",
    "SamplerName",
    "SamplerSpec",
    "ScheduleKind",
    "guided_model_fn",
    "invert_ddim",
    "loss_weight",
    "make_denoiser",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "target_for",
    "timesteps",
    "to_x0_and_eps",
]
