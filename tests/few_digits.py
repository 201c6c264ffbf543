"""A subset of the embedded digits for stage-2 tests: the real data pipeline at a fraction of the cost."""

from lightning_ldm.data.base import TensorImages
from lightning_ldm.data.digits import DigitsDataModule


class FewDigits(DigitsDataModule):
    """Every ``every``-th digit (every 25th: 200 images, 20 per class)."""

    def __init__(self, every: int = 25, **kwargs) -> None:
        super().__init__(**kwargs)
        self.every = every

    def _load_source(self) -> TensorImages:
        source = super()._load_source()
        return TensorImages(source.pixels[::self.every], source.labels[::self.every], self.image_size)

    def _source_identity(self) -> dict:
        return {**super()._source_identity(), "subset": f"every {self.every}th"}
