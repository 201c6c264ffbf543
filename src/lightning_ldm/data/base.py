"""What every DataModule shares: the deterministic train/val split, the split views, the loaders.

A *source* is anything with ``__len__``, ``split_keys()`` (one stable string per item) and ``load(index)`` ->
(uint8 (C, H, W) tensor already at ``image_size``, int label) that raises ``DataError`` naming the item when
it cannot be decoded. A captioned source also has ``captions(index)`` -> the item's captions (one or more
strings); the split views then add a ``"caption"`` to every item: one of them at random per training step, the
first in validation. A DataModule builds one source in ``_load_source`` and this module does the rest, so
the digits, image folders/zips and torchvision sets split, scale, flip and batch identically.
"""

import hashlib
import warnings
from typing import Any, Iterator, Optional, Protocol, Sequence

import lightning.pytorch as pl
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torch.utils.data import DataLoader, Dataset

from lightning_ldm.data.transforms import RESAMPLE_NAME, mirror_caption, random_hflip, resize_uint8, to_signed_unit
from lightning_ldm.errors import ConfigError, DataError

# How a lazily failing image is replaced in skip mode: the next items of the same split, at most this many.
_MAX_SKIPS = 64


class ImageSource(Protocol):
    def __len__(self) -> int: ...
    def split_keys(self) -> Sequence[str]: ...
    def load(self, index: int) -> tuple[torch.Tensor, int]: ...


def has_captions(source: Any) -> bool:
    return callable(getattr(source, "captions", None))


def _rank_key(seed: int, key: str) -> bytes:
    # blake2b, unlike hash(), is the same in every process, on every machine and Python version.
    return hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()


def validation_count(total: int, val_fraction: float) -> int:
    """round(total * val_fraction), but at least one image on each side when both can have one."""
    count = round(total * val_fraction)
    if val_fraction > 0 and total >= 2:
        count = min(max(count, 1), total - 1)
    return count


def split_indices(keys: Sequence[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices: the val set is the ``validation_count`` items with the smallest hash of (seed, key).

    Ranking by a hash of each item's own key, never by its position, makes the split independent of listing
    order and worker count, and adding k items moves only about k * val_fraction existing items across the
    boundary instead of reshuffling everything. Train is sorted ascending; val stays in hash order, so that
    its first batch (the one shown in image grids) mixes classes even when the files are sorted by class.
    """
    order = sorted(range(len(keys)), key=lambda i: (_rank_key(seed, keys[i]), keys[i]))
    count = validation_count(len(keys), val_fraction)
    return sorted(order[count:]), order[:count]


class TensorImages:
    """In-memory source: uint8 (N, C, h, w) pixels and labels, resized per item when image_size differs."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, image_size: int):
        self.pixels = pixels
        self.labels = labels.long()
        self.image_size = image_size

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def split_keys(self) -> list[str]:
        return [str(i) for i in range(len(self))]

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return resize_uint8(self.pixels[index], self.image_size), int(self.labels[index])


def pick_caption(captions: Sequence[Any], draw: bool) -> Any:
    """One of an item's captions: drawn at random (torch's RNG) when ``draw``, else the first."""
    return captions[int(torch.randint(len(captions), ()))] if draw and len(captions) > 1 else captions[0]


class SplitView(Dataset):
    """One side of the split: items ``{"image": float (C, H, W) in [-1, 1], "label": int}``, plus ``"caption"``
    (str) for a captioned source.

    Train and val run the same preprocessing; only the train view flips (``flip``), and a flipped image's
    caption has "left" and "right" swapped. The train view (``draw_captions``) draws one of an item's captions at
    random each time (torch's RNG, seeded per worker); val always takes the first, so validation is fixed. With
    ``skip_corrupt`` an item that fails to decode is replaced by the next one of the same view, so nothing leaks
    across.
    """

    def __init__(self, source: ImageSource, indices: Sequence[int], *, flip: bool, skip_corrupt: bool = False,
                 draw_captions: bool = False):
        self.source = source
        self.indices = list(indices)
        self.flip = flip
        self.skip_corrupt = skip_corrupt
        self.draw_captions = draw_captions

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index, (pixels, label) = self._load(i)
        image, mirrored = to_signed_unit(pixels), False
        if self.flip:
            image, mirrored = random_hflip(image)
        item = {"image": image, "label": label}
        if has_captions(self.source):
            item["caption"] = self.caption(index, mirrored)
        return item

    def caption(self, index: int, mirrored: bool = False) -> str:
        """One caption of source item ``index``: drawn at random in the train view, the first in the other."""
        chosen = pick_caption(self.source.captions(index), self.draw_captions)
        return mirror_caption(chosen) if mirrored else chosen

    def first_captions(self) -> list[str]:
        """Each item's first caption, in view order, unmirrored: the fixed prompts of grids, FID and evaluation."""
        return [self.source.captions(index)[0] for index in self.indices] if has_captions(self.source) else []

    def _load(self, i: int) -> tuple[int, tuple[torch.Tensor, int]]:
        if not self.skip_corrupt:
            return self.indices[i], self.source.load(self.indices[i])
        for step in range(min(_MAX_SKIPS, len(self.indices))):
            index = self.indices[(i + step) % len(self.indices)]
            try:
                return index, self.source.load(index)
            except DataError as error:
                warnings.warn(f"skipping an unreadable image: {error}", stacklevel=2)
                last_error = error
        raise DataError(f"{_MAX_SKIPS} images in a row could not be read; last: {last_error}")


def original_error(error: DataError) -> DataError:
    """The DataError raised inside a DataLoader worker, without torch's multi-line traceback wrapper.

    torch re-raises a worker's exception as ``type(e)("Caught ... Original Traceback ... <module.Type>: msg")``;
    the user-facing error must stay one line, so take the message back from the traceback's last line.
    """
    text = str(error)
    if "Original Traceback" not in text:
        return error
    prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
    for line in reversed(text.splitlines()):
        if line.startswith(prefix):
            return type(error)(line[len(prefix) :])
    return error


class _UnwrappingIterator:
    def __init__(self, iterator):
        self._iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._iterator)
        except DataError as error:
            unwrapped = original_error(error)
            if unwrapped is error:
                raise
            raise unwrapped from None

    def __len__(self) -> int:
        return len(self._iterator)

    def __getattr__(self, name: str):
        return getattr(self._iterator, name)


class ImageDataLoader(StatefulDataLoader):
    """A DataLoader whose worker-side DataErrors reach the user as the original one-line DataError.

    Stateful (torchdata): Lightning saves its position in every checkpoint, so a run resumed mid-epoch
    continues with exactly the batches the uninterrupted run would have seen.
    """

    def __iter__(self):
        return _UnwrappingIterator(super().__iter__())


class ImageDataModule(pl.LightningDataModule):
    """Base of every DataModule. Subclasses set ``name``, ``channels``, ``num_classes`` and implement
    ``_load_source`` and ``_source_identity``; ``setup`` and the loaders live here."""

    name: str
    channels: int
    num_classes: Optional[int]

    def __init__(
        self,
        *,
        image_size: int,
        batch_size: int,
        num_workers: int,
        val_fraction: float,
        flip: bool,
        seed: int,
        skip_corrupt: bool = False,
    ):
        super().__init__()
        if image_size < 1:
            raise ConfigError(f"data.image_size must be a positive number of pixels, got {image_size}")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be 0 or more, got {num_workers}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.flip = flip
        self.seed = seed
        self.skip_corrupt = skip_corrupt
        self.train_dataset: Optional[SplitView] = None
        self.val_dataset: Optional[SplitView] = None

    def _load_source(self) -> ImageSource:
        raise NotImplementedError

    def _source_identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is not None:
            return  # idempotent: Lightning calls setup per stage, and callers may call it again
        source = self._load_source()
        train, val = split_indices(source.split_keys(), self.val_fraction, self.seed)
        self.train_dataset = SplitView(source, train, flip=self.flip, skip_corrupt=self.skip_corrupt,
                                       draw_captions=True)
        self.val_dataset = SplitView(source, val, flip=False, skip_corrupt=self.skip_corrupt)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        if len(self.train_dataset) < self.batch_size:
            raise DataError(
                f"data.batch_size={self.batch_size} is larger than the {len(self.train_dataset)} training images "
                f"of {self.name}; lower data.batch_size or add images"
            )
        return self.loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self.loader(self.val_dataset, train=False)

    def loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        return ImageDataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,  # equal-sized steps; the val set is seen whole
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # Its own generator: shuffling and worker seeds never draw from (or shift) the global RNG that
            # training noise comes from, and the order is fixed by data.seed.
            generator=torch.Generator().manual_seed(self.seed + (0 if train else 1)),
        )

    @property
    def captioned(self) -> bool:
        self.setup()
        return has_captions(self.train_dataset.source)

    def training_captions(self) -> Iterator[str]:
        """Every caption of every training item (what a tokenizer is trained on); never validation's."""
        if not self.captioned:
            raise DataError(f"data {self.name} has no captions, but text conditioning needs them: give the images "
                            "captions (metadata.jsonl or a .txt beside each image for data=folder) or choose "
                            "conditioning=none / class")
        source = self.train_dataset.source
        for index in self.train_dataset.indices:
            yield from source.captions(index)

    def identity(self) -> dict[str, Any]:
        """JSON-able description of the data and its preprocessing, for cache keys and matching exports."""
        return {
            "name": self.name,
            **self._source_identity(),
            "image_size": self.image_size,
            "channels": self.channels,
            "num_classes": self.num_classes,
            "resize": RESAMPLE_NAME,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "split": "blake2b-rank",
            "flip": self.flip,
        }
