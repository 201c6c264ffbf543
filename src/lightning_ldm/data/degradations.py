"""Training pairs made on the fly from any images: low-resolution inputs for super-resolution and masks for
inpainting (the paper's Sec. 4.4-4.5 tasks). Every draw comes from the ``generator`` passed in, so validation
can use a fixed seed and see the same pairs every time; None draws from torch's global RNG (in a DataLoader
worker: seeded per worker, as the flips are).

Super-resolution: downsampling by ``factor`` with ``area`` (the mean of each factor x factor block, so the
low-resolution image is exactly what the high-resolution one averages to) or ``bicubic`` (antialiased), then
optionally a degradation in the spirit of the paper's BSR pipeline: Gaussian blur before downsampling, Gaussian
noise and JPEG after it, each with a strength drawn per image.

Inpainting masks (1 = generated, 0 = kept, as ``stage=sample``'s mask files): ``box`` (one rectangle of 1/4 to
1/2 of each side) or ``strokes`` (a few thick random polylines), never empty and never the whole image.
"""

import io
import math
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from lightning_ldm.errors import ConfigError

Downsampling = Literal["area", "bicubic"]
MaskKind = Literal["box", "strokes"]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(C, H, W) blurred with a separable Gaussian of ``sigma`` pixels, edges replicated."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=image.dtype) / sigma) ** 2)
    taps = (taps / taps.sum()).to(image.device)
    channels = image.shape[0]
    x = F.pad(image[None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return x[0]


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """(C, H, W) in [-1, 1] through an 8-bit JPEG at ``quality`` and back."""
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    mode = "L" if pixels.shape[2] == 1 else "RGB"
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(buffer, format="JPEG", quality=quality)
    decoded = np.array(Image.open(buffer).convert(mode), dtype=np.float32)
    decoded = decoded[..., None] if mode == "L" else decoded
    return torch.from_numpy(decoded).permute(2, 0, 1).to(image.device) / 127.5 - 1


def low_resolution(images: torch.Tensor, factor: int, *, mode: Downsampling = "area",
                   blur_sigma: Optional[tuple[float, float]] = None, noise_std: Optional[tuple[float, float]] = None,
                   jpeg_quality: Optional[tuple[int, int]] = None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The low-resolution input (N, C, H/factor, W/factor) of high-resolution ``images`` (N, C, H, W) in [-1, 1].
    The degradation ranges are (low, high); each image draws its own strength from ``generator``."""
    if factor < 1 or images.shape[-1] % factor or images.shape[-2] % factor:
        raise ConfigError(f"super-resolution factor {factor} must divide the image size "
                          f"{images.shape[-1]}x{images.shape[-2]}")
    if mode not in ("area", "bicubic"):
        raise ConfigError(f"downsampling must be area or bicubic, got {mode!r}")
    out = []
    for image in images:
        if blur_sigma is not None:
            image = _gaussian_blur(image, _uniform(generator, *blur_sigma))
        size = (image.shape[-2] // factor, image.shape[-1] // factor)
        small = F.interpolate(image[None], size=size, mode=mode, **({"antialias": True, "align_corners": False}
                                                                     if mode == "bicubic" else {}))[0]
        if noise_std is not None:
            noise = torch.randn(small.shape, generator=generator).to(small.device)
            small = small + _uniform(generator, *noise_std) * noise
        if jpeg_quality is not None:
            small = _jpeg(small, int(round(_uniform(generator, *jpeg_quality))))
        out.append(small.clamp(-1, 1))
    return torch.stack(out)


def inpainting_masks(n: int, size: int, kind: MaskKind = "box",
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n`` masks (n, 1, size, size) of 0 and 1 (1 = generated): never empty, never the whole image."""
    if kind not in ("box", "strokes"):
        raise ConfigError(f"mask kind must be box or strokes, got {kind!r}")
    masks = torch.zeros(n, 1, size, size)
    for mask in masks:
        if kind == "box":
            height = int(_uniform(generator, size / 4, size / 2))
            width = int(_uniform(generator, size / 4, size / 2))
            top = int(_uniform(generator, 0, size - height))
            left = int(_uniform(generator, 0, size - width))
            mask[0, top:top + height, left:left + width] = 1
            continue
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(_uniform(generator, 1, 4))):
            points = [(_uniform(generator, 0, size), _uniform(generator, 0, size))
                      for _ in range(int(_uniform(generator, 2, 5)))]
            draw.line(points, fill=255, width=max(1, int(_uniform(generator, size / 16, size / 6))), joint="curve")
        mask[0] = torch.from_numpy(np.array(canvas) >= 128).float()
        if mask.sum() == 0:  # a degenerate draw: fall back to a small square in the middle
            mask[0, size // 3:2 * size // 3, size // 3:2 * size // 3] = 1
        if mask.sum() == mask.numel():
            mask[0, : size // 4] = 0
    return masks
