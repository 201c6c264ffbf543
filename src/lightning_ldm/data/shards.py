"""Streaming tar shards in WebDataset's layout (``key.jpg`` / ``key.png`` with ``key.txt`` captions, one per
line, or ``key.json`` with ``text`` / ``caption``, and ``key.cls`` labels), read through the ``webdataset``
library from local paths or any fsspec URL (``s3://``, ``gs://``, ``https://``, ``memory://``).

Why webdataset and not LitData: the issue's layout is WebDataset's tar layout, which webdataset reads as it is
(tar parsing, grouping files into samples by key, splitting shards across ranks and loader workers), and which
every tool that writes shards (img2dataset, webdataset's own writers) produces; LitData streams its own chunk
format, written by its ``optimize`` step, not tars. Shards are opened through fsspec rather than webdataset's
``gopen`` (which shells out to curl or gsutil), so any filesystem fsspec knows works, credentials included.

Each epoch every shard is read exactly once: the shard list is split across ranks (``webdataset.split_by_node``)
and then across the loader workers of a rank (``webdataset.split_by_worker``); a rank's workers visit their
shards in an order drawn from (seed, epoch), and training items pass through a seeded shuffle buffer. Images get
the same preprocessing as ``data=folder``. ``write_shards`` (``python -m lightning_ldm.data.shards``) turns a
folder, zip or ``metadata.jsonl`` dataset into shards with an ``index.json``.
"""

import hashlib
import io
import json
from typing import Any, Iterator, Optional, Sequence

import fsspec
import lightning as L
import torch
from PIL import Image
from torch.utils.data import IterableDataset

from lightning_ldm.data.transforms import PIL_MODES, center_crop_resize, mirror_caption, pil_to_uint8, to_signed_unit
from lightning_ldm.errors import ConfigError, DataError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")


def expand_urls(urls: Any) -> list[str]:
    """Shard URLs from a list, a brace pattern (``s3://b/shard-{000000..000099}.tar``), several joined by ``::``,
    or a folder (local or remote) of ``.tar`` files."""
    from braceexpand import braceexpand

    if isinstance(urls, (list, tuple)):
        return [u for url in urls for u in expand_urls(url)]
    found = []
    for part in str(urls).split("::"):
        for url in braceexpand(part):
            if url.endswith(".tar"):
                found.append(url)
                continue
            fs, path = fsspec.core.url_to_fs(url)
            if not fs.isdir(path):
                raise DataError(f"data.urls: {url} is neither a .tar shard nor a folder of them")
            protocol = url.split("://")[0] + "://" if "://" in url else ""
            tars = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
            if not tars:
                raise DataError(f"data.urls: {url} holds no .tar shards")
            found += [protocol + p if protocol and not p.startswith(protocol) else p for p in tars]
    return found


def decode_sample(sample: dict, *, mode: str, image_size: int) -> tuple[torch.Tensor, int, list[str]]:
    """(uint8 (C, H, W) at ``image_size``, label, captions) of one sample, as ``data=folder`` preprocesses."""
    name = next((k for k in IMAGE_KEYS if k in sample), None)
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    if name is None:
        raise DataError(f"shard sample {where} has no image ({', '.join(IMAGE_KEYS)})")
    try:
        with Image.open(io.BytesIO(sample[name])) as image:
            from lightning_ldm.data.folder import to_mode

            pixels = pil_to_uint8(center_crop_resize(to_mode(image, mode), image_size))
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError and more
        raise DataError(f"cannot decode image {where}.{name} ({type(error).__name__})") from None
    label = int(sample["cls"].decode().strip()) if "cls" in sample else 0
    return pixels, label, decode_captions(sample)


def decode_captions(sample: dict) -> list[str]:
    """A sample's captions: the lines of its ``.txt``, or its ``.json``'s ``text`` / ``caption`` (one or a list)."""
    if "txt" in sample:
        return [line.strip() for line in sample["txt"].decode("utf-8").splitlines() if line.strip()]
    if "json" in sample:
        row = json.loads(sample["json"])
        text = row.get("text", row.get("caption")) if isinstance(row, dict) else None
        return [text] if isinstance(text, str) else list(text or [])
    return []


def _opened(urls: Sequence[str], storage_options: dict) -> Iterator[dict]:
    for url in urls:
        try:
            stream = fsspec.open(url, "rb", **storage_options).open()
        except (OSError, ValueError) as error:
            raise DataError(f"cannot open shard {url} ({type(error).__name__}: {error})") from None
        yield {"url": url, "stream": stream}


def raw_samples(urls: Sequence[str], storage_options: Optional[dict] = None) -> Iterator[dict]:
    """The samples of ``urls`` in order, as webdataset groups a tar's files by key (bytes per extension)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return group_by_keys(tar_file_expander(_opened(urls, storage_options or {})))


class ShardStream(IterableDataset):
    """Items ``{"image", "label"[, "caption"]}`` of shards, each read once per epoch across ranks and workers.

    ``state_dict`` / ``load_state_dict`` (called in each loader worker by torchdata's StatefulDataLoader, whose
    state Lightning keeps in every checkpoint) record the epoch and how many items this worker has given, so a
    resumed run skips exactly those and continues with the next one."""

    def __init__(self, urls: Sequence[str], *, image_size: int, channels: int, train: bool, flip: bool, seed: int,
                 captioned: bool, shuffle_buffer: int = 1000, storage_options: Optional[dict] = None) -> None:
        self.urls, self.image_size, self.channels, self.mode = list(urls), image_size, channels, PIL_MODES[channels]
        self.train, self.flip, self.seed, self.captioned = train, flip and train, seed, captioned
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.storage_options = storage_options or {}
        self.epoch, self.given, self._skip = 0, 0, 0

    def my_shards(self, epoch: int) -> list[str]:
        """This rank's and this worker's shards (webdataset's split), in the epoch's order."""
        from webdataset import split_by_node, split_by_worker

        mine = list(split_by_worker(list(split_by_node(self.urls))))
        if self.train:
            order = torch.randperm(len(mine), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            mine = [mine[i] for i in order.tolist()]
        return mine

    def _generator(self, *parts: int) -> torch.Generator:
        """A generator for this rank and worker: every draw is a function of (seed, epoch, ...), so skipping items
        on resume never shifts the draws of the items that follow."""
        from webdataset.utils import pytorch_worker_info

        rank, _, worker, _ = pytorch_worker_info()
        digest = hashlib.blake2b(repr((self.seed, rank, worker, *parts)).encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))

    def _items(self, epoch: int) -> Iterator[dict]:
        generator = self._generator(epoch)
        buffer: list[dict] = []
        for sample in raw_samples(self.my_shards(epoch), self.storage_options):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            if self.shuffle_buffer:
                pick = int(torch.randint(len(buffer), (), generator=generator))
                buffer[pick], sample = sample, buffer[pick]
            yield sample
        while buffer:
            yield buffer.pop(int(torch.randint(len(buffer), (), generator=generator)))

    def __iter__(self) -> Iterator[dict]:
        epoch, skip = self.epoch, self._skip
        self.given, self._skip = skip, 0
        for index, sample in enumerate(self._items(epoch)):
            if index < skip:
                continue
            pixels, label, captions = decode_sample(sample, mode=self.mode, image_size=self.image_size)
            draws = self._generator(epoch, index) if self.train else None
            image, mirrored = to_signed_unit(pixels), False
            if self.flip and torch.rand((), generator=draws) < 0.5:
                image, mirrored = image.flip(-1), True
            item = {"image": image, "label": label}
            if self.captioned:
                if not captions:
                    raise DataError(f"shard sample {sample['__url__']}:{sample['__key__']} has no caption (.txt or .json)")
                pick = int(torch.randint(len(captions), (), generator=draws)) if draws is not None else 0
                item["caption"] = mirror_caption(captions[pick]) if mirrored else captions[pick]
            self.given += 1
            yield item
        self.epoch, self.given = epoch + 1, 0

    def in_order(self) -> "ShardStream":
        """The same shards read as validation reads them: every sample once, in shard order, unflipped, with its
        first caption (FID's reference, evaluation)."""
        return ShardStream(self.urls, image_size=self.image_size, channels=self.channels, train=False, flip=False,
                           seed=self.seed, captioned=self.captioned, storage_options=self.storage_options)

    def first_captions(self) -> list[str]:
        """Each sample's first caption, in shard order: the fixed prompts of grids and evaluation."""
        if not self.captioned:
            return []
        return [decode_captions(sample)[0] for sample in raw_samples(self.urls, self.storage_options)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "given": self.given}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._skip = int(state["epoch"]), int(state["given"])


class ShardDataModule(L.LightningDataModule):
    """``data=shards``: training (and optionally validation) shards, read as streams; see the module docstring.

    Stage 1 and stage 2 train from it, stage 2 from the latent cache by default (one cache chunk per shard); FID
    computes its reference statistics over the validation shards."""

    name = "shards"
    streams = True  # items come as streams, never by index: the latent cache and FID read each split whole

    def __init__(self, *, urls: Any, val_urls: Any = None, image_size: int = 32, channels: int = 3,
                 num_classes: Optional[int] = None, captioned: bool = False, batch_size: int = 32,
                 num_workers: int = 4, flip: bool = True, seed: int = 0, shuffle_buffer: int = 1000,
                 storage_options: Optional[dict] = None) -> None:
        super().__init__()
        if channels not in PIL_MODES:
            raise ConfigError(f"data.channels must be 1 or 3, got {channels}")
        self.urls_config, self.val_urls_config = urls, val_urls
        self.image_size, self.channels, self.num_classes, self.captioned = image_size, channels, num_classes, captioned
        self.batch_size, self.num_workers, self.flip, self.seed = batch_size, num_workers, flip, seed
        self.shuffle_buffer, self.storage_options = shuffle_buffer, dict(storage_options or {})
        self.val_fraction = 0.0 if val_urls is None else None
        self.train_dataset: Optional[ShardStream] = None
        self.val_dataset: Optional[ShardStream] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is not None:
            return
        common = dict(image_size=self.image_size, channels=self.channels, seed=self.seed, captioned=self.captioned,
                      storage_options=self.storage_options)
        self.train_urls = expand_urls(self.urls_config)
        self.train_dataset = ShardStream(self.train_urls, train=True, flip=self.flip,
                                         shuffle_buffer=self.shuffle_buffer, **common)
        self.val_urls = expand_urls(self.val_urls_config) if self.val_urls_config else []
        self.val_dataset = ShardStream(self.val_urls, train=False, flip=False, **common) if self.val_urls else None

    def loader(self, dataset, *, train: bool):
        """A loader of a stream, or of an indexed dataset made from the shards (the latent cache), shuffled by
        ``seed`` for training."""
        from lightning_ldm.data.base import ImageDataLoader

        indexed = not isinstance(dataset, IterableDataset)
        return ImageDataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                               drop_last=train, shuffle=train if indexed else None,
                               generator=torch.Generator().manual_seed(self.seed) if indexed else None)

    def train_dataloader(self):
        self.setup()
        return self.loader(self.train_dataset, train=True)

    def val_dataloader(self):
        self.setup()
        return [] if self.val_dataset is None else self.loader(self.val_dataset, train=False)

    def training_captions(self) -> Iterator[str]:
        """Every caption of the training shards (a pass over them, reading only what they hold)."""
        self.setup()
        for sample in raw_samples(self.train_urls, self.storage_options):
            yield from decode_captions(sample)

    def identity(self) -> dict[str, Any]:
        self.setup()
        return {"name": self.name, "urls": self.train_urls, "val_urls": self.val_urls, "image_size": self.image_size,
                "channels": self.channels, "num_classes": self.num_classes, "flip": self.flip, "seed": self.seed,
                "crop": "center-square"}

