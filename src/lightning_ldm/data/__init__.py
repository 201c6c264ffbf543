"""Lightning DataModules yielding batches ``{"image": float (B, C, H, W) in [-1, 1], "label": long (B,)}``."""

from lightning_ldm.data.base import ImageDataModule, original_error, split_indices
from lightning_ldm.data.captioned_digits import CaptionedDigitsDataModule
from lightning_ldm.data.digits import DigitsDataModule
from lightning_ldm.data.folder import IMAGE_EXTENSIONS, ImageFolderDataModule
from lightning_ldm.data.torchvision_sets import TorchvisionDataModule

__all__ = [
    "IMAGE_EXTENSIONS",
    "CaptionedDigitsDataModule",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "TorchvisionDataModule",
    "original_error",
    "split_indices",
]
