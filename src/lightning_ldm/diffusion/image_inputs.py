"""Input images (and inpainting masks) for ``stage=sample``: read from a folder or a zip, checked against the
model before any sampling, one clear line for each thing that is wrong.

Images keep their size (it must be divisible by the first stage's factor; all alike, so they batch) and are
converted to the model's channels. A mask has the same relative path as its image (any image extension); white
(>= 128) marks what is generated and black what is kept, the convention of Stable Diffusion's inpainting tools.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from lightning_ldm.data.folder import open_store, read_pixels
from lightning_ldm.errors import DataError


@dataclass
class InputImages:
    names: list[str]  # relative paths, the output files' names (as .png)
    pixels: torch.Tensor  # float (N, C, H, W) in [-1, 1]
    keep: Optional[torch.Tensor]  # float (N, 1, H, W): 1 where the input is kept, 0 where it is generated


def latent_keep_mask(keep: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, 1, H, W) pixel mask -> latent mask: a latent is known only if every pixel it encodes is (a min-pool),
    so replacement never pastes a latent that also encodes generated pixels."""
    return -F.max_pool2d(-keep, factor) if factor > 1 else keep


PIL_MODES = {1: "L", 3: "RGB"}


def to_pixels(arrays: list[np.ndarray], channels: int, what: str) -> torch.Tensor:
    """uint8 arrays (H, W[, C]) of one size -> float (N, C, H, W) in [-1, 1]."""
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise DataError(f"{what}: the images have {len(sizes)} different sizes "
                        f"({', '.join(f'{w}x{h}' for h, w in sorted(sizes))}); give images of one size")
    pixels = torch.from_numpy(np.stack(arrays)).float() / 127.5 - 1
    return pixels[:, None] if channels == 1 else pixels.permute(0, 3, 1, 2)


def check_divisible(pixels: torch.Tensor, factor: int, what: str) -> None:
    height, width = pixels.shape[-2:]
    if height % factor or width % factor:
        raise DataError(f"{what} are {width}x{height}, not divisible by the first stage's factor {factor}: "
                        f"crop or resize them to a multiple of {factor}")


def keep_mask(plane: np.ndarray, what: str) -> torch.Tensor:
    """An 8-bit mask (H, W) -> float (H, W), 1 where the input is kept (black, < 128), 0 where it is generated."""
    generated = plane >= 128
    if not generated.any():
        raise DataError(f"mask {what} is all black: nothing to generate")
    if generated.all():
        raise DataError(f"mask {what} is all white: nothing is kept (sample without masks)")
    return torch.from_numpy(~generated).float()


def read_input_images(images: str, masks: Optional[str], *, channels: int, factor: int) -> InputImages:
    image_store = open_store(images, "sample.images")
    members = sorted(member for member, _, _ in image_store.entries())
    if not members:
        raise DataError(f"sample.images={images} holds no images (png, jpg, webp, bmp)")
    arrays = [read_pixels(image_store, m, PIL_MODES[channels]) for m in members]
    pixels = to_pixels(arrays, channels, "sample.images")
    check_divisible(pixels, factor, "sample.images")
    keep = None
    if masks is not None:
        mask_store = open_store(masks, "sample.masks")
        by_stem = {Path(m).with_suffix("").as_posix(): m for m, _, _ in mask_store.entries()}
        planes = []
        for member, array in zip(members, arrays):
            mask_member = by_stem.get(Path(member).with_suffix("").as_posix())
            if mask_member is None:
                raise DataError(f"sample.masks={masks} has no mask for {member} (same name, any image extension)")
            plane = read_pixels(mask_store, mask_member, "L")
            if plane.shape != array.shape[:2]:
                raise DataError(f"mask {mask_store.describe(mask_member)} is {plane.shape[1]}x{plane.shape[0]}, its "
                                f"image {member} {array.shape[1]}x{array.shape[0]}")
            planes.append(keep_mask(plane, mask_store.describe(mask_member)))
        keep = torch.stack(planes)[:, None]
    return InputImages([str(Path(m).with_suffix(".png")) for m in members], pixels, keep)
