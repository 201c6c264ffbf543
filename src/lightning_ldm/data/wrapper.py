"""The base of data modules that wrap an image data module (cached latents, image-task pairs): everything they do
not change is the image data's own (its split, identity, captions, loader settings, state)."""

from typing import Any, Optional

import lightning as L


class WrappedImageData(L.LightningDataModule):
    def __init__(self, images: L.LightningDataModule) -> None:
        super().__init__()
        self.images = images

    def __getattr__(self, name: str) -> Any:
        # Only reached for what the wrapper lacks: the image data's attributes (image_size, identity, captions...).
        images = self.__dict__.get("images")
        if images is None:
            raise AttributeError(name)
        return getattr(images, name)

    @property
    def name(self) -> str:  # LightningDataModule's own (None) would hide the image data's
        return self.images.name

    def prepare_data(self) -> None:
        self.images.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        self.images.trainer = self.trainer
        self.images.setup(stage)

    def val_dataloader(self):
        return self.images.val_dataloader()

    def state_dict(self) -> dict:
        return self.images.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.images.load_state_dict(state_dict)

    def teardown(self, stage: str) -> None:
        self.images.teardown(stage)
