"""Training pairs for image-conditioned models, made on the fly from any image data: each item of the image data
gains what its condition is made of (``low_res`` for super-resolution, ``mask`` for inpainting), drawn per item
from the full-resolution image it already holds.

Training draws afresh each time an item is read (torch's RNG, seeded per DataLoader worker as the flips are), so
a model never sees the same degradation or mask twice. Validation draws from a generator seeded by the item's
position, so every validation pass (and ``stage=evaluate``) sees the same fixed pairs.
"""

import functools
import hashlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Optional, Protocol, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lightning_ldm.data.degradations import inpainting_masks, low_resolution
from lightning_ldm.data.folder import open_store, read_pixels
from lightning_ldm.data.transforms import center_crop_resize
from lightning_ldm.data.wrapper import WrappedImageData
from lightning_ldm.errors import ConfigError, DataError

MASK_KINDS = ("box", "strokes", "mixed")


class PairMaker(Protocol):
    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator], key: str) -> dict[str, torch.Tensor]:
        """What ``image`` (the item of split key ``key``) adds to its item, drawn from ``generator`` (None: the
        global RNG)."""


@dataclass(frozen=True)
class SuperResolutionPairs:
    """``low_res``: the image downsampled by ``factor`` (area or antialiased bicubic), optionally degraded (blur
    before, noise and JPEG after the downsampling; each strength drawn per image within its (low, high) range)."""

    factor: int
    downsampling: str = "bicubic"
    blur_sigma: Optional[tuple[float, float]] = None
    noise_std: Optional[tuple[float, float]] = None
    jpeg_quality: Optional[tuple[int, int]] = None

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator], key: str = "") -> dict[str, torch.Tensor]:
        low = low_resolution(image[None], self.factor, mode=self.downsampling, blur_sigma=self.blur_sigma,
                             noise_std=self.noise_std, jpeg_quality=self.jpeg_quality, generator=generator)
        return {"low_res": low[0]}


@dataclass(frozen=True)
class InpaintingPairs:
    """``mask`` (1, H, W), 1 = generated: a rectangle, free-form strokes, or either at random (``mixed``); or
    ``files``: each image's own mask from ``mask_root`` (a folder or zip), at the image's path with any image
    extension, white = generated, brought to the data's size as the images are (centre crop, resize)."""

    masks: str = "mixed"
    mask_root: Optional[str] = None

    def __post_init__(self) -> None:
        if self.masks not in (*MASK_KINDS, "files"):
            raise ConfigError(f"inpainting masks must be one of {', '.join(MASK_KINDS)} or files, got {self.masks!r}")
        if (self.masks == "files") != (self.mask_root is not None):
            raise ConfigError("inpainting masks=files reads mask_root (a folder or zip of masks), and only it does")

    def check(self) -> None:
        """Before training: a missing or unreadable mask root is one line now, not an error in a worker. (Not at
        construction: a checkpoint names the root it trained with, and must load where that root is gone.)"""
        if self.mask_root is not None:
            _mask_index(self.mask_root)

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator], key: str = "") -> dict[str, torch.Tensor]:
        if self.masks == "files":
            return {"mask": self._from_file(key, image.shape[-1])}
        if image.shape[-1] != image.shape[-2]:
            raise DataError(f"inpainting masks are drawn on square images, got {image.shape[-1]}x{image.shape[-2]}")
        kind = self.masks
        if kind == "mixed":
            kind = "box" if torch.rand((), generator=generator) < 0.5 else "strokes"
        return {"mask": inpainting_masks(1, image.shape[-1], kind, generator=generator)[0]}

    def _from_file(self, key: str, size: int) -> torch.Tensor:
        store, by_stem = _mask_index(self.mask_root)
        member = by_stem.get(PurePosixPath(key).with_suffix("").as_posix())
        if member is None:
            raise DataError(f"mask_root={self.mask_root} has no mask for {key} (same path, any image extension)")
        plane = read_pixels(store, member, "L")
        plane = np.asarray(center_crop_resize(Image.fromarray(plane), size)) >= 128
        if not plane.any() or plane.all():
            raise DataError(f"mask {store.describe(member)} is all {'black' if not plane.any() else 'white'}: "
                            "a training mask must keep some pixels and generate some")
        return torch.from_numpy(plane).float()[None]


@functools.lru_cache(maxsize=4)
def _mask_index(root: str):
    """The store of ``root`` and its members by path without extension: listed once per process."""
    store = open_store(root, "mask_root")
    return store, {PurePosixPath(m).with_suffix("").as_posix(): m for m, _, _ in store.entries()}


def fixed_generator(seed: int, index: int) -> torch.Generator:
    """The generator of validation item ``index``: the same pair every pass, independent of batch and workers."""
    digest = hashlib.blake2b(f"pairs\0{seed}\0{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


class PairedView(Dataset):
    """A split view whose items also carry each maker's inputs; ``fixed_seed`` set: the same pairs every pass."""

    def __init__(self, view: Dataset, makers: Sequence[PairMaker], fixed_seed: Optional[int] = None) -> None:
        self.view, self.makers, self.fixed_seed = view, list(makers), fixed_seed

    def __len__(self) -> int:
        return len(self.view)

    def __getattr__(self, name: str) -> Any:  # the view's source, indices and captions
        view = self.__dict__.get("view")
        if view is None:
            raise AttributeError(name)
        return getattr(view, name)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.view[i]
        generator = None if self.fixed_seed is None else fixed_generator(self.fixed_seed, i)
        key = self._key(i)
        for make in self.makers:
            item.update(make(item["image"], generator, key))
        return item

    def _key(self, i: int) -> str:
        """The item's key in its source (a folder's relative path), which names a mask file."""
        view = self.view
        if not hasattr(view, "source") or not hasattr(view, "indices"):
            return str(i)
        if getattr(self, "_keys", None) is None:
            self._keys = view.source.split_keys()
        return self._keys[view.indices[i]]


class ImagePairs(WrappedImageData):
    """The data side of image-conditioned training: an image data module whose loaders serve paired items
    (``PairedView``); everything else (identity, captions, the split) is the image data's own."""

    def __init__(self, images: L.LightningDataModule, makers: Sequence[PairMaker]) -> None:
        super().__init__(images)
        if not makers:
            raise ConfigError("ImagePairs needs at least one pair maker")
        self.makers = list(makers)
        for maker in self.makers:
            getattr(maker, "check", lambda: None)()

    def paired(self, split: str) -> PairedView:
        """The ``train`` (fresh pairs) or ``val`` (fixed pairs) view."""
        self.images.setup()
        if split == "train":
            return PairedView(self.images.train_dataset, self.makers)
        return PairedView(self.images.val_dataset, self.makers, fixed_seed=self.images.seed)

    def train_dataloader(self) -> DataLoader:
        self.images.train_dataloader()  # its checks (a batch larger than the split: one line)
        return self.images.loader(self.paired("train"), train=True)

    def val_dataloader(self) -> DataLoader:
        return self.images.loader(self.paired("val"), train=False)
