"""The embedded default dataset: 5,000 real MNIST digits shipped inside the package (``data/embedded/``).

It needs no download and no path, so a fresh install can train and test offline. The file is
``mnist_5k.csv.gz``: 5,000 rows of 785 integers, the 784 pixels (row-major 28x28, 0-255, white digit on black)
followed by the label (the *last* column; 500 of each class, sorted by label). Its source and licence are noted
beside it (``embedded/README.md``).
"""

import functools
import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_ldm.data.base import ImageDataModule, TensorImages
from lightning_ldm.data.transforms import convert_channels_uint8, pad_uint8
from lightning_ldm.errors import ConfigError, DataError

MNIST_5K = Path(__file__).resolve().parent / "embedded" / "mnist_5k.csv.gz"
_MNIST_5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"  # as embedded/README.md
_DIGIT_SIZE = 28
_CANVAS = 32  # MNIST padded by 2 px of background per side, the usual size for power-of-two UNets


def mnist_5k_path() -> Path:
    if not MNIST_5K.is_file():
        raise DataError(f"the embedded digits {MNIST_5K} are missing from this installation: reinstall lightning_ldm")
    return MNIST_5K


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (5000, 1, 28, 28) digits, int64 (5000,) labels), read once per process."""
    with gzip.open(mnist_5k_path(), "rt") as file:
        table = np.loadtxt(file, delimiter=",", dtype=np.int64)
    pixels = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 1, _DIGIT_SIZE, _DIGIT_SIZE)
    return pixels, torch.from_numpy(table[:, -1])


class DigitsDataModule(ImageDataModule):
    """5,000 MNIST digits (10 classes), 1 channel, padded to 32x32; ``image_size`` != 32 resizes the padded digit.

    Digits are not mirror-symmetric, so ``flip`` is off by default.
    """

    num_classes = 10

    def __init__(
        self,
        *,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        flip: bool = False,
        seed: int = 0,
        image_size: int = 32,
        channels: int = 1,
    ):
        if channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 (greyscale) or 3 (grey repeated to RGB), got {channels}")
        super().__init__(
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            val_fraction=val_fraction,
            flip=flip,
            seed=seed,
        )
        self.name = "digits"
        self.channels = channels

    def _load_source(self) -> TensorImages:
        pixels, labels = load_mnist_5k()
        return TensorImages(convert_channels_uint8(pad_uint8(pixels, _CANVAS), self.channels), labels, self.image_size)

    def _source_identity(self) -> dict[str, Any]:
        return {"source": "embedded/mnist_5k.csv.gz", "sha256": _MNIST_5K_SHA256, "num_images": 5000, "pad": f"28->{_CANVAS}"}
