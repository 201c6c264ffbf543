"""Synthetic images of any size, generated on the fly: for benchmarks and scaling runs at a preset's real shapes
(256x256 stage 1, 64x64x3 latents for stage 2 with ``autoencoder=identity``) without a dataset on disk.

Each image is smooth random colour fields (a few octaves of upsampled Gaussian noise, quantised to 8 bits like a
real image file) drawn from a generator seeded by its index, so item i is the same on every rank, worker and
run, and nothing is stored. Never zeros: constant inputs can run faster than real data and hide bugs.
"""

import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F

from lightning_ldm.data.base import ImageDataModule
from lightning_ldm.errors import ConfigError


class SyntheticImages:
    """``num_images`` reproducible random images as uint8 (C, size, size); label = index mod ``num_classes``."""

    def __init__(self, num_images: int, image_size: int, channels: int, num_classes: int, seed: int):
        self.num_images, self.image_size, self.channels = num_images, image_size, channels
        self.num_classes, self.seed = num_classes, seed

    def __len__(self) -> int:
        return self.num_images

    def split_keys(self) -> list[str]:
        return [str(i) for i in range(self.num_images)]

    @functools.lru_cache(maxsize=2048)  # per process; generation costs ~3 ms at 256^2, a training step less
    def load(self, index: int) -> tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        size, field = self.image_size, torch.zeros(1, self.channels, self.image_size, self.image_size)
        for octave in (4, 16, 64):  # coarse shapes plus finer texture: 1/f-like, as natural images are
            cells = min(octave, size)
            noise = torch.randn(1, self.channels, cells, cells, generator=generator)
            field += F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False) * (4 / octave) ** 0.5
        pixels = (field[0] * 48 + 127.5).round().clamp(0, 255).to(torch.uint8)
        return pixels, index % self.num_classes


_WORDS = ("red", "green", "blue", "round", "square", "small", "large", "bright", "dark", "soft", "sharp", "striped")


class CaptionedSyntheticImages(SyntheticImages):
    """The same images with a reproducible caption each (12-word vocabulary, one to six words): for timing and
    smoke-testing text conditioning, not for learning anything."""

    def captions(self, index: int) -> list[str]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 7)
        count = 1 + int(torch.randint(6, (), generator=generator))
        return [" ".join(_WORDS[i] for i in torch.randint(len(_WORDS), (count,), generator=generator).tolist())]


class SyntheticDataModule(ImageDataModule):
    """``data=synthetic``: random smooth images of ``image_size`` and ``channels`` (see the module docstring)."""

    def __init__(
        self,
        *,
        num_images: int = 10000,
        image_size: int = 256,
        channels: int = 3,
        num_classes: Optional[int] = None,
        batch_size: int = 8,
        num_workers: int = 4,
        val_fraction: float = 0.01,
        flip: bool = False,
        seed: int = 0,
        captions: bool = False,
    ):
        if channels < 1:
            raise ConfigError(f"data.channels must be at least 1, got {channels}")
        if num_images < 2:
            raise ConfigError(f"data.num_images must be at least 2, got {num_images}")
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                         val_fraction=val_fraction, flip=flip, seed=seed)
        self.name = "synthetic"
        self.channels = channels
        self.num_classes = num_classes
        self.num_images = num_images
        self.captions = captions

    def _load_source(self) -> SyntheticImages:
        kind = CaptionedSyntheticImages if self.captions else SyntheticImages
        return kind(self.num_images, self.image_size, self.channels, self.num_classes or 1, self.seed)

    def _source_identity(self) -> dict[str, Any]:
        return {"source": "synthetic", "num_images": self.num_images, "generator": "octaves-4-16-64-v1",
                "captions": self.captions}
