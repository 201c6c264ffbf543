"""Pixel preprocessing shared by every dataset: PIL image -> uint8 CHW -> float in [-1, 1].

Kept as plain functions (no torchvision.transforms) so the train and validation paths, the FID reference images
and the exports all run the very same code: FID is off by 2-3x when reference images are cropped or resized
differently from the training images.
"""

import re
import numpy as np
import torch
from PIL import Image

# LANCZOS is antialiased when shrinking (PIL filters with the full kernel support scaled to the reduction) and
# is what the EDM/StyleGAN dataset tools use for centre-crop datasets.
RESAMPLE = Image.Resampling.LANCZOS
RESAMPLE_NAME = "lanczos"
PIL_MODES = {1: "L", 3: "RGB"}


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Largest centred square, then resized to ``size`` x ``size``; an image already that size is returned as is."""
    width, height = image.size
    side = min(width, height)
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), RESAMPLE)
    return image


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """(C, H, W) uint8 tensor of an "L" or "RGB" image."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def uint8_to_pil(pixels: torch.Tensor) -> Image.Image:
    array = pixels.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, PIL_MODES[array.shape[2]])


def resize_uint8(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Square (C, H, W) uint8 resized to ``size`` with the same filter as image files, so sources agree."""
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return pixels
    return pil_to_uint8(center_crop_resize(uint8_to_pil(pixels), size))


def pad_uint8(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Centre (..., h, w) uint8 digits on a ``size`` x ``size`` canvas of background 0 (-1 after scaling)."""
    height, width = pixels.shape[-2:]
    top, left = (size - height) // 2, (size - width) // 2
    padding = (left, size - width - left, top, size - height - top)
    return torch.nn.functional.pad(pixels, padding, value=0)


def to_signed_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (0 -> -1, 255 -> 1)."""
    return pixels.float().div_(127.5).sub_(1.0)


def random_hflip(image: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Mirror left-right with probability 1/2, drawing from torch's RNG (seeded per DataLoader worker); also
    says whether it mirrored, so that a caption can follow the image (``mirror_caption``)."""
    if torch.rand(()) < 0.5:
        return image.flip(-1), True
    return image, False


_LEFT_RIGHT = re.compile(r"\b(left|right)(most)?\b", re.IGNORECASE)


def mirror_caption(caption: str) -> str:
    """The caption of the mirrored image: "left" and "right" swapped as whole words (case kept), so that a flip
    stays a valid augmentation for text conditioning instead of teaching the model that the words are noise."""

    def swap(match: "re.Match[str]") -> str:
        word = match.group(1)
        other = {"left": "right", "right": "left"}[word.lower()]
        if word.isupper():
            other = other.upper()
        elif word[0].isupper():
            other = other.capitalize()
        return other + (match.group(2) or "")

    return _LEFT_RIGHT.sub(swap, caption)


def convert_channels_uint8(pixels: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) to ``channels`` channels: grey repeated to RGB, RGB to grey by ITU-R 601 luma."""
    if pixels.shape[1] == channels:
        return pixels
    if pixels.shape[1] == 1 and channels == 3:
        return pixels.expand(-1, 3, -1, -1).contiguous()
    if pixels.shape[1] == 3 and channels == 1:
        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (pixels.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {pixels.shape[1]} channels to {channels}")
