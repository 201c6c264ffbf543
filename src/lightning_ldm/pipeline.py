"""The Python API: ``load_pipeline(run_dir_or_file)`` gives a callable that returns PIL images.

>>> from lightning_ldm import load_pipeline
>>> pipe = load_pipeline("outputs/diffusion/quickstart")
>>> images = pipe(n=16, steps=20, guidance=3.0, seed=0)   # prompt=..., classes=... for conditional models

Image i comes from seed ``seed + i`` and takes prompt or class i mod n of the given list, the mapping of
``stage=sample`` (``diffusion/seeds.py``): the same seed gives the same image here and there. A stage-1 run or
export gives an ``AutoencoderPipeline`` that reconstructs, encodes and decodes images.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from lightning_ldm.diffusion.image_inputs import PIL_MODES, check_divisible, keep_mask, to_pixels
from lightning_ldm.errors import ConfigError, DataError
from lightning_ldm.file_format import model_kind, resolve_model_file

PILImages = Union[Image.Image, Sequence[Image.Image]]


def _default_device(device: Union[str, torch.device, None]) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _as_list(images: PILImages) -> list[Image.Image]:
    return [images] if isinstance(images, Image.Image) else list(images)


def pil_arrays(images: PILImages, channels: int, what: str = "images") -> list[np.ndarray]:
    """PIL images as uint8 arrays in the model's channels (greyscale or RGB)."""
    arrays = [np.asarray(image.convert(PIL_MODES[channels])) for image in _as_list(images)]
    if not arrays:
        raise DataError(f"no {what} given")
    return arrays


def pil_to_tensor(images: PILImages, channels: int, what: str = "images") -> torch.Tensor:
    """PIL images of one size -> float (N, C, H, W) in [-1, 1], converted to the model's channels."""
    return to_pixels(pil_arrays(images, channels, what), channels, what)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] (N, C, H, W) -> PIL images (greyscale for one channel)."""
    from lightning_ldm.training.images import to_uint8

    arrays = to_uint8(images).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


class AutoencoderPipeline:
    """A first stage (``FrozenFirstStage``) for images in and out: ``reconstruct``, ``encode``, ``decode``."""

    def __init__(self, first_stage, device: Union[str, torch.device, None] = None) -> None:
        self.device = _default_device(device)
        self.first_stage = first_stage.to(self.device)

    @torch.no_grad()
    def encode(self, images: PILImages) -> torch.Tensor:
        """Scaled posterior means (N, c, H/f, W/f): the latents a diffusion model on this first stage sees."""
        pixels = pil_to_tensor(images, self.first_stage.image_channels)
        check_divisible(pixels, self.first_stage.downsampling_factor, "images")
        return self.first_stage.encode_mean(pixels.to(self.device))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        return tensor_to_pil(self.first_stage.decode(latents.to(self.device)).float())

    def reconstruct(self, images: PILImages) -> list[Image.Image]:
        return self.decode(self.encode(images))


class LatentDiffusionPipeline:
    """A stage-2 model as a function of (n, prompt or classes, steps, guidance, seed) to PIL images."""

    def __init__(self, module, device: Union[str, torch.device, None] = None) -> None:
        self.device = _default_device(device)
        self.module = module.to(self.device).eval()
        self.autoencoder = AutoencoderPipeline(self.module.first_stage, self.device)

    @property
    def num_classes(self) -> Optional[int]:
        return self.module.num_classes

    @property
    def reads_text(self) -> bool:
        return self.module.conditioner.reads_text

    @property
    def image_task(self) -> Optional[str]:
        """"super_resolution", "inpainting" or None."""
        return self.module.image_task

    def describe(self) -> str:
        return self.module.describe_conditioning()

    def reconstruct(self, images: PILImages) -> list[Image.Image]:
        return self.autoencoder.reconstruct(images)

    @torch.no_grad()
    def __call__(self, n: Optional[int] = None, *, prompt: Union[str, Sequence[str], None] = None,
                 classes: Union[int, Sequence[int], None] = None, steps: Optional[int] = None,
                 guidance: Optional[float] = None, seed: int = 0, sampler: Optional[str] = None,
                 eta: Optional[float] = None, negative_prompt: Optional[str] = None,
                 image: Optional[PILImages] = None, mask: Optional[PILImages] = None, strength: float = 1.0,
                 batch_size: int = 16, progress: bool = False) -> list[Image.Image]:
        """n images from seeds seed .. seed + n - 1. ``steps``, ``guidance`` (classifier-free guidance scale, 1 is
        none) and ``sampler`` default to the model's own sampling settings.

        ``image``: input images; for a super-resolution model the low-resolution inputs; for any other model the
        start of image-to-image at ``strength`` < 1 and, with ``mask`` (white = generate, black = keep),
        inpainting. n defaults to the number of input images, else 1."""
        from lightning_ldm.diffusion.seeds import labels_for, prompts_for

        module = self.module
        pixels, keep = self._inputs(image, mask)
        if n is None:
            n = 1 if pixels is None else len(pixels)
        if n < 1:
            raise ConfigError(f"n must be at least 1, got {n}")
        if pixels is not None and len(pixels) != n:
            raise ConfigError(f"{len(pixels)} input images for n={n}: give one image per output")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        class_pool = [classes] if isinstance(classes, int) else classes
        seeds = list(range(seed, seed + n))
        prompts_for(seeds[:1], prompts, self.reads_text)  # one line for a prompt/model mismatch before any work
        outputs: list[Image.Image] = []
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext())
        for start in range(0, n, batch_size):
            batch = seeds[start:start + batch_size]
            rows = slice(start, start + len(batch))
            labels = labels_for(batch, class_pool, self.num_classes)
            extra = {}
            if pixels is not None:
                extra = ({"low_res": pixels[rows]} if self.image_task == "super_resolution" else
                         {"image": pixels[rows], "strength": strength, "keep": None if keep is None else keep[rows]})
            with autocast:
                images, _ = module.generate(
                    len(batch), labels=None if labels is None else labels.to(self.device),
                    prompts=prompts_for(batch, prompts, self.reads_text), negative_prompt=negative_prompt,
                    generator=torch.Generator(device=self.device).manual_seed(batch[0]), sampler=sampler,
                    steps=steps, eta=eta, guidance_scale=guidance, x_T=self._noise(batch, extra).to(self.device),
                    progress=progress, **extra)
            outputs.extend(tensor_to_pil(images))
        return outputs

    def _inputs(self, image: Optional[PILImages], mask: Optional[PILImages]):
        if image is None:
            if mask is not None or self.image_task is not None:
                raise ConfigError("mask= applies to input images: give image= as well" if mask is not None else
                                  f"this model is {self.describe()}: give input images (image=...)")
            return None, None
        channels = self.module.first_stage.image_channels
        pixels = pil_to_tensor(image, channels, "input images")
        factor = 1 if self.image_task == "super_resolution" else self.module.first_stage.downsampling_factor
        check_divisible(pixels, factor, "input images")
        keep = None
        if mask is not None:
            planes = pil_arrays(mask, 1, "masks")
            if len(planes) != len(pixels) or any(plane.shape != tuple(pixels.shape[-2:]) for plane in planes):
                raise DataError("give one mask per input image, of the image's size")
            keep = torch.stack([keep_mask(plane, f"number {i}") for i, plane in enumerate(planes)])[:, None]
        return pixels, keep

    def _noise(self, batch: list[int], extra: dict) -> torch.Tensor:
        """x_T of each seed, at the latent size the inputs (if any) give, as stage=sample draws it."""
        from lightning_ldm.diffusion.seeds import initial_noise

        inputs = {key: extra[key] for key in ("image", "low_res") if key in extra}
        return initial_noise(batch, self.module.latent_shape(**inputs))


def load_pipeline(source: Union[str, Path], device: Union[str, torch.device, None] = None
                  ) -> Union[LatentDiffusionPipeline, AutoencoderPipeline]:
    """The model of a run directory or file: a ``LatentDiffusionPipeline`` for stage 2, an ``AutoencoderPipeline``
    for stage 1 or for another codebase's autoencoder (a diffusers VAE folder such as Stable Diffusion's, whose
    latents are then scaled by its ``scaling_factor``). ``device`` defaults to the GPU when there is one."""
    from lightning_ldm.interop.autoencoder import pretrained_autoencoder_kind

    if Path(source).expanduser().is_dir() and pretrained_autoencoder_kind(source) == "diffusers":
        from lightning_ldm.latent.first_stage import load_first_stage

        return AutoencoderPipeline(load_first_stage(path=str(Path(source).expanduser())), device)
    path = resolve_model_file(source)
    if model_kind(path, "load_pipeline") == "autoencoder":
        from lightning_ldm.latent.first_stage import load_first_stage

        # unscaled latents: a stage-1 model has no diffusion model to scale them for
        return AutoencoderPipeline(load_first_stage(path=str(path), scale_factor=1.0), device)
    from lightning_ldm.diffusion.checkpoint import load_diffusion_model

    return LatentDiffusionPipeline(load_diffusion_model(str(path)), device)
