"""Cached latents (as EDM2 and fast-DiT do): encode the training set once, then train from the cache so the
encoder costs nothing per step. Captions are cached alike, in a file of their own keyed by what encodes them:
token ids keyed by the tokenizer (trained when training starts), or a frozen text encoder's outputs keyed by its
files, so a new tokenizer or encoder never reads stale encodings and the latents are reused across them.

The cache stores the posterior mean and std of every training image (and of its mirror image when the data
flips), so the KL posterior can still be sampled afresh each step, in chunk files (``chunk-000000.pt``, ...): runs
of ``CHUNK_ITEMS`` images of an indexed dataset, one chunk per shard of a shard-backed one (which also keeps each
sample's captions as text, having no index to read them back by). Every rank encodes its share of the chunks in
parallel, each written atomically when whole, so an interrupted build resumes at the first missing chunk and the
cache is the same whatever the number of ranks; every rank then maps all chunks into memory. Its folder name is a
hash of the first stage
(its config and a digest of the weights actually loaded, not the export file's name or date: a resumed run
encodes with the checkpoint's first stage, whatever has since been written over the export), the data
identity and preprocessing: any change gives a new key, so a stale cache is never read.
"""

import bisect
import copy
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from lightning_ldm.atomic import atomic_path
from lightning_ldm.data.base import ImageDataLoader, has_captions, pick_caption
from lightning_ldm.data.transforms import mirror_caption, to_signed_unit
from lightning_ldm.data.wrapper import WrappedImageData
from lightning_ldm.errors import DataError

CACHE_VERSION = 2


def cache_key(first_stage_identity: dict, data_identity: dict) -> str:
    payload = json.dumps({"v": CACHE_VERSION, "first_stage": first_stage_identity, "data": data_identity},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def weights_digest(model: torch.nn.Module) -> str:
    """Hash of every tensor of ``model`` (names, dtypes, shapes and bytes); about 1 s per GB on a CPU."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def first_stage_identity(first_stage) -> dict:
    """What the cached latents depend on: the architecture and its weights (the scale is applied later)."""
    identity: dict[str, Any] = {"config": first_stage.export_config.get("config"),
                                "identity": bool(first_stage.export_config.get("identity"))}
    if first_stage.autoencoder is not None:
        identity["weights"] = weights_digest(first_stage.autoencoder)
    return identity


CHUNK_ITEMS = 4096  # images per chunk file of an indexed dataset (a shard-backed one: one chunk per shard)


def chunk_path(directory: Path, index: int) -> Path:
    return directory / f"chunk-{index:06d}.pt"


class LatentDataset(Dataset):
    """Cached (mean, std, label) per image, read from the cache's chunk files; with flips, a random one of the two
    stored orientations. Captions are drawn as the image view draws them (one of an item's captions at random,
    mirrored with the mirrored latent): from ``captions`` when they were encoded into the cache
    (``encode_captions``: token ids or a frozen encoder's outputs, keyed by what encoded them), else as text from
    the view's source by index, or from the chunks themselves for shard-backed data (which has no index).

    Each process maps the chunk files into memory the first time it reads them (and drops the mapping when the
    dataset is pickled into a loader worker): pages are read on first use and shared through the page cache by
    every process of a machine, so no rank or worker holds a private copy of the cache."""

    def __init__(self, chunks: Sequence[Path], captions_from: Optional[Dataset] = None,
                 captions: Optional[dict] = None) -> None:
        self.paths = [Path(path) for path in chunks]
        self.view = captions_from if captions_from is not None and has_captions(
            getattr(captions_from, "source", None)) else None
        self.captions = captions
        self._chunks: dict[int, dict] = {}
        sizes = [self.chunk(i)["labels"].shape[0] for i in range(len(self.paths))]
        self.offsets = [0, *itertools.accumulate(sizes)]
        first = self.chunk(0) if self.paths else {}
        self.flipped = "mean_flipped" in first
        self.texts = "captions" in first

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_chunks": {}}

    def chunk(self, index: int) -> dict:
        if index not in self._chunks:
            self._chunks[index] = torch.load(self.paths[index], map_location="cpu", weights_only=True, mmap=True)
        return self._chunks[index]

    def column(self, key: str) -> torch.Tensor:
        """One stored field of every item, in order (a copy: for tests and small caches)."""
        return torch.cat([self.chunk(i)[key] for i in range(len(self.paths))])

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict:
        position = bisect.bisect_right(self.offsets, index) - 1
        chunk, row = self.chunk(position), index - self.offsets[position]
        mirrored = bool(self.flipped and torch.rand(()) < 0.5)
        suffix = "_flipped" if mirrored else ""
        item = {"latent_mean": chunk["mean" + suffix][row].float(), "latent_std": chunk["std" + suffix][row].float(),
                "label": chunk["labels"][row]}
        if self.captions is not None:
            pick = pick_caption(self.captions["mirrored" if mirrored else "plain"][index], draw=True)
            item["caption"] = {key: rows[pick] for key, rows in self.captions["rows"].items()}
        elif self.view is not None:
            item["caption"] = self.view.caption(self.view.indices[index], mirrored)
        elif self.texts:
            text = pick_caption(chunk["captions"][row], draw=True)
            item["caption"] = mirror_caption(text) if mirrored else text
        return item


class _ChunkImages(IterableDataset):
    """The images of some chunks, batched within each chunk, in order: ``{"chunk", "image", "label"[, "captions"],
    "last"}`` per batch. A loader worker takes whole chunks (every ``num_workers``-th), so a chunk's items keep
    their order whatever the worker count."""

    def __init__(self, chunks: Sequence[tuple[int, Any]], items_of, batch_size: int) -> None:
        self.chunks, self.items_of, self.batch_size = list(chunks), items_of, batch_size

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        mine = self.chunks[info.id::info.num_workers] if info is not None else self.chunks
        for index, unit in mine:
            batch: list[dict] = []
            items = iter(self.items_of(unit))
            item = next(items, None)
            while item is not None:
                batch.append(item)
                item = next(items, None)
                if len(batch) == self.batch_size or item is None:
                    yield self._collate(index, batch, last=item is None)
                    batch = []

    @staticmethod
    def _collate(index: int, items: list[dict], last: bool) -> dict:
        batch = {"chunk": index, "last": last, "image": torch.stack([item["image"] for item in items]),
                 "label": torch.tensor([item["label"] for item in items])}
        if "captions" in items[0]:
            batch["captions"] = [item["captions"] for item in items]
        return batch


def _view_items(view: Dataset):
    """Items of positions ``unit`` (a range) of an unflipped split view."""
    def items(unit: range) -> Iterator[dict]:
        return (view[i] for i in unit)
    return items


def _shard_items(stream):
    """Decoded samples of one shard, in order, with all their captions (no flip, no shuffle)."""
    from lightning_ldm.data.shards import decode_sample, raw_samples

    def items(url: str) -> Iterator[dict]:
        for sample in raw_samples([url], stream.storage_options):
            pixels, label, captions = decode_sample(sample, mode=stream.mode, image_size=stream.image_size)
            item = {"image": to_signed_unit(pixels), "label": label}
            if stream.captioned:
                if not captions:
                    raise DataError(f"shard sample {sample['__url__']}:{sample['__key__']} has no caption")
                item["captions"] = captions
            yield item
    return items


def cache_plan(view: Dataset, chunk_items: int = CHUNK_ITEMS) -> tuple[list[Any], Callable]:
    """(units, items_of): chunk i holds the images ``items_of(units[i])`` yields. A split view is cut into runs of
    ``chunk_items`` positions; a shard stream gives one chunk per shard, since shards cannot be indexed."""
    if isinstance(view, IterableDataset):
        return list(view.urls), _shard_items(view)
    unflipped = copy.copy(view)
    unflipped.flip = False  # the mirror images are encoded explicitly
    # A drawn caption would take a number from the global RNG in this process: a run that builds the cache must
    # train on the same noise as one that finds it built.
    unflipped.draw_captions = False
    return [range(start, min(start + chunk_items, len(view))) for start in range(0, len(view), chunk_items)], \
        _view_items(unflipped)


@torch.no_grad()
def encode_chunks(first_stage, units: Sequence[Any], items_of, directory: Path, *, flip: bool, batch_size: int,
                  device: torch.device, num_workers: int = 0, rank: int = 0, world_size: int = 1) -> int:
    """Encode this rank's chunks (every ``world_size``-th, from ``rank``) that are not yet on disk, each written
    atomically once whole: an interrupted build resumes where it stopped, and every rank encodes its own slice in
    parallel. Returns how many chunks this call encoded."""
    pending = [(i, unit) for i, unit in enumerate(units) if i % world_size == rank and not chunk_path(directory, i).is_file()]
    if not pending:
        return 0
    directory.mkdir(parents=True, exist_ok=True)
    # The data's own loader workers decode the images: in the main process, decoding a large dataset would take
    # hours, and the main process's many intra-op threads fight every other process on the node for the CPUs.
    # Its own generator: whether the cache had to be built must not change the training noise that follows.
    loader = ImageDataLoader(_ChunkImages(pending, items_of, batch_size), batch_size=None,
                             num_workers=min(num_workers, len(pending)), generator=torch.Generator().manual_seed(0))
    parts: dict[int, dict[str, list]] = {}
    progress = tqdm(total=len(pending), desc=f"Latent cache: encoding chunks (rank {rank})", unit="chunk",
                    leave=False, position=rank)
    for batch in loader:
        part = parts.setdefault(batch["chunk"], {})
        images = batch["image"].to(device)
        encodings = [("", images)] + ([("_flipped", torch.flip(images, dims=[-1]))] if flip else [])
        for suffix, pixels in encodings:
            mean, std = first_stage.encode_distribution(pixels)
            part.setdefault("mean" + suffix, []).append(mean.half().cpu())
            part.setdefault("std" + suffix, []).append(std.half().cpu())
        part.setdefault("labels", []).append(batch["label"])
        if "captions" in batch:
            part.setdefault("captions", []).extend(batch["captions"])
        if batch["last"]:
            done = parts.pop(batch["chunk"])
            chunk = {key: value if key == "captions" else torch.cat(value) for key, value in done.items()}
            with atomic_path(chunk_path(directory, batch["chunk"])) as tmp:
                torch.save(chunk, tmp)
            progress.update()
    progress.close()
    return len(pending)


@torch.no_grad()
def encode_captions(embedder, view, device: torch.device, batch_size: int = 256) -> dict:
    """Every caption of every item of ``view`` (and its mirror when the view flips), encoded once by
    ``embedder.encode_for_cache``: ``rows`` holds one encoding per distinct text, ``plain[i]`` / ``mirrored[i]``
    the rows of item i's captions."""
    texts: dict[str, int] = {}

    def rows_of(captions) -> list[int]:
        return [texts.setdefault(text, len(texts)) for text in captions]

    plain, mirrored = [], []
    for index in tqdm(view.indices, desc="Latent cache: gathering the training captions", leave=False):
        captions = view.source.captions(index)
        plain.append(rows_of(captions))
        if view.flip:
            mirrored.append(rows_of(mirror_caption(text) for text in captions))
    strings = list(texts)
    parts = [embedder.encode_for_cache(strings[start:start + batch_size], device)
             for start in tqdm(range(0, len(strings), batch_size), desc="Latent cache: encoding the captions",
                               leave=False)]
    return {"rows": {key: torch.cat([part[key] for part in parts]) for key in parts[0]}, "plain": plain,
            "mirrored": mirrored}


def cached_caption_embedder(conditioner) -> Optional[Any]:
    """The embedder whose caption encodings the cache holds: the one embedder reading captions, if it caches."""
    readers = [e for e in conditioner.embedders.values() if e.input_key == "caption"]
    return readers[0] if len(readers) == 1 and readers[0].cache_identity() is not None else None


def _load_or_build(path: Path, build, what: str, *, is_global_zero: bool, barrier) -> Any:
    """Rank 0 builds the file if it is missing (atomically); every rank then maps it into memory."""
    if is_global_zero and not path.is_file():
        print(f"Latent cache: encoding {what} -> {path}")
        with atomic_path(path) as tmp:
            torch.save(build(), tmp)
    barrier()
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_or_build_cache(first_stage, datamodule, cache_dir: Path, device: torch.device, *, rank: int = 0,
                        world_size: int = 1, barrier=lambda: None, caption_embedder=None,
                        chunk_items: int = CHUNK_ITEMS) -> tuple[LatentDataset, Path]:
    """The training split's latents (and, with ``caption_embedder``, its captions encoded) from ``cache_dir``,
    built first where missing: every rank encodes its share of the chunks, then all read all of them."""
    view, data_identity = datamodule.train_dataset, datamodule.identity()
    units, items_of = cache_plan(view, chunk_items)
    key = cache_key(first_stage_identity(first_stage), {**data_identity, "chunk_items": chunk_items})
    directory = Path(cache_dir) / f"latents-{key}"
    missing = sum(not chunk_path(directory, i).is_file() for i in range(len(units)))
    if rank == 0:
        print(f"Latent cache: {directory}: " + (f"encoding {missing} of {len(units)} chunks on {world_size} "
                                                f"rank{'s' if world_size > 1 else ''}" if missing else "reusing it"))
    encode_chunks(first_stage, units, items_of, directory, flip=bool(getattr(datamodule, "flip", False)),
                  batch_size=max(64, datamodule.batch_size), device=device,
                  num_workers=getattr(datamodule, "num_workers", 0), rank=rank, world_size=world_size)
    barrier()
    captions = None
    if caption_embedder is not None and has_captions(getattr(view, "source", None)):
        captions_key = cache_key({"captions": caption_embedder.cache_identity()}, data_identity)
        captions = _load_or_build(Path(cache_dir) / f"captions-{captions_key}.pt",
                                  lambda: encode_captions(caption_embedder, view, device), "the training captions",
                                  is_global_zero=rank == 0, barrier=barrier)
    chunks = [chunk_path(directory, i) for i in range(len(units))]
    return LatentDataset(chunks, view if not isinstance(view, IterableDataset) else None, captions), directory


class CachedLatents(WrappedImageData):
    """The data side of latent caching: an image data module whose training loader serves the cached latents of
    its training split instead of its images. Everything else (the validation split, the training images that FID
    compares with, captions, identity) is the image data's own.

    The cache is built (or found) the first time ``latents()`` is asked for, with the first stage of the module
    being trained: after Lightning restored a resumed checkpoint, so a resumed run caches the weights it trains
    with, not whatever export now sits at the configured path. ``cache_dir`` None: ``latent_cache`` beside the
    run directory, shared by the runs of one output root."""

    def __init__(self, images: L.LightningDataModule, cache_dir: Optional[str] = None) -> None:
        super().__init__(images)
        self.cache_dir = cache_dir
        self.path: Optional[Path] = None
        self._latents: Optional[LatentDataset] = None

    def latents(self) -> LatentDataset:
        if self._latents is None:
            trainer = self.trainer
            cache_dir = Path(self.cache_dir or Path(trainer.default_root_dir).parent / "latent_cache")
            module = trainer.lightning_module
            conditioner = getattr(module, "conditioner", None)
            self._latents, self.path = load_or_build_cache(
                module.first_stage, self.images, cache_dir, module.device, rank=trainer.global_rank,
                world_size=trainer.world_size, barrier=trainer.strategy.barrier,
                caption_embedder=cached_caption_embedder(conditioner) if conditioner is not None else None)
        return self._latents

    def train_dataloader(self) -> DataLoader:
        latents = self.latents()
        if len(latents) < self.images.batch_size:
            raise DataError(f"data.batch_size={self.images.batch_size} is larger than the {len(latents)} cached "
                            f"training latents of {self.images.name}; lower data.batch_size or add images")
        return self.images.loader(latents, train=True)
