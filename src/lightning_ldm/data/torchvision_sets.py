"""MNIST, Fashion-MNIST and CIFAR-10 through torchvision, from a local root.

Only torchvision's *train* split is used and split again into train/val like every other source (the test
split stays untouched for final evaluation). Nothing is downloaded unless ``download=True``; the download
runs in ``prepare_data`` (once per node), and ``setup`` only reads.
"""

import os
from typing import Any, Literal, Optional

import numpy as np
import torch

from lightning_ldm.data.base import ImageDataModule, TensorImages
from lightning_ldm.data.transforms import convert_channels_uint8, pad_uint8
from lightning_ldm.errors import ConfigError, DataError

# name -> (torchvision class, channels); the 28x28 sets are padded to 32 like the embedded digits.
_SETS = {"mnist": ("MNIST", 1), "fashion_mnist": ("FashionMNIST", 1), "cifar10": ("CIFAR10", 3)}
_CANVAS = 32


class TorchvisionDataModule(ImageDataModule):
    """A standard torchvision dataset (train split) stored under ``root``; see the module docstring."""

    def __init__(
        self,
        *,
        name: Literal["mnist", "fashion_mnist", "cifar10"],
        root: str,
        download: bool = False,
        image_size: int = 32,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        flip: Optional[bool] = None,
        seed: int = 0,
        channels: Optional[int] = None,
    ):
        if name not in _SETS:
            raise ConfigError(f"data.name must be one of {sorted(_SETS)}, got {name!r}")
        super().__init__(
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            val_fraction=val_fraction,
            flip=(name == "cifar10") if flip is None else flip,  # None: mirror photos, never digits
            seed=seed,
        )
        self.name = name
        self.root = str(root)
        self.download = download
        if channels not in (None, 1, 3):
            raise ConfigError(f"data.channels must be 1, 3 or null (the dataset's own), got {channels}")
        self.channels = _SETS[name][1] if channels is None else channels
        self.num_classes = 10

    def _dataset(self, download: bool):
        import torchvision.datasets  # slow to import; only this source needs it

        root = os.path.expanduser(self.root)
        if not download and not os.path.isdir(root):
            raise DataError(f"{self.name} root {self.root} does not exist; set data.download=true to fetch it")
        cls = getattr(torchvision.datasets, _SETS[self.name][0])
        try:
            return cls(root, train=True, download=download)
        except RuntimeError as error:
            reason = " ".join(str(error).split())
            if download:
                raise DataError(f"could not download {self.name} into {self.root} ({reason})") from None
            raise DataError(
                f"{self.name} not found (or incomplete) under {self.root}; set data.download=true to fetch it"
            ) from None

    def prepare_data(self) -> None:
        if self.download:
            self._dataset(download=True)

    def _load_source(self) -> TensorImages:
        dataset = self._dataset(download=False)
        data = dataset.data
        pixels = torch.as_tensor(np.asarray(data), dtype=torch.uint8)
        if pixels.ndim == 3:  # MNIST-like (N, 28, 28) greyscale
            pixels = pad_uint8(pixels[:, None], _CANVAS)
        else:  # CIFAR-10 (N, 32, 32, 3)
            pixels = pixels.permute(0, 3, 1, 2).contiguous()
        pixels = convert_channels_uint8(pixels, self.channels)
        return TensorImages(pixels, torch.as_tensor(dataset.targets), self.image_size)

    def _source_identity(self) -> dict[str, Any]:
        return {
            "source": f"torchvision:{_SETS[self.name][0]}:train",
            "root": os.path.realpath(os.path.expanduser(self.root)),
            "pad": f"28->{_CANVAS}" if _SETS[self.name][1] == 1 else None,
        }
