"""Cached latents (as EDM2 and fast-DiT do): encode the training set once, then train from the cache so the
encoder costs nothing per step. Captions are cached alike, in a file of their own keyed by what encodes them:
token ids keyed by the tokenizer (trained when training starts), or a frozen text encoder's outputs keyed by its
files, so a new tokenizer or encoder never reads stale encodings and the latents are reused across them.

The cache stores the posterior mean and std of every training image (and of its mirror image when the data
flips), so the KL posterior can still be sampled afresh each step. Its file name is a hash of the first stage
(its config and a digest of the weights actually loaded, not the export file's name or date: a resumed run
encodes with the checkpoint's first stage, whatever has since been written over the export), the data
identity and preprocessing: any change gives a new key, so a stale cache is never read.
"""

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lightning_ldm.atomic import atomic_path
from lightning_ldm.data.base import ImageDataLoader, has_captions, pick_caption
from lightning_ldm.data.transforms import mirror_caption
from lightning_ldm.data.wrapper import WrappedImageData
from lightning_ldm.errors import DataError

CACHE_VERSION = 1


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


class LatentDataset(Dataset):
    """Cached (mean, std, label) per image; with flips, a random one of the two stored orientations. Captions
    are drawn as the image view draws them (one of an item's captions at random, mirrored with the mirrored
    latent): from ``captions`` when they were encoded into the cache (``encode_captions``: token ids or a frozen
    encoder's outputs, keyed by what encoded them), else as text from the view's source by index."""

    def __init__(self, cache: dict, captions_from: Optional[Dataset] = None,
                 captions: Optional[dict] = None) -> None:
        self.mean, self.std, self.labels = cache["mean"], cache["std"], cache["labels"]
        self.view = captions_from if captions_from is not None and has_captions(
            getattr(captions_from, "source", None)) else None
        self.captions = captions
        self.flipped = "mean_flipped" in cache
        if self.flipped:
            self.mean_flipped, self.std_flipped = cache["mean_flipped"], cache["std_flipped"]

    def __len__(self) -> int:
        return self.mean.shape[0]

    def __getitem__(self, index: int) -> dict:
        mirrored = bool(self.flipped and torch.rand(()) < 0.5)
        if mirrored:
            mean, std = self.mean_flipped[index], self.std_flipped[index]
        else:
            mean, std = self.mean[index], self.std[index]
        item = {"latent_mean": mean.float(), "latent_std": std.float(), "label": self.labels[index]}
        if self.captions is not None:
            row = pick_caption(self.captions["mirrored" if mirrored else "plain"][index], draw=True)
            item["caption"] = {key: rows[row] for key, rows in self.captions["rows"].items()}
        elif self.view is not None:
            item["caption"] = self.view.caption(self.view.indices[index], mirrored)
        return item


@torch.no_grad()
def encode_dataset(first_stage, dataset: Dataset, *, flip: bool, batch_size: int, device: torch.device,
                   num_workers: int = 0) -> dict:
    unflipped = copy.copy(dataset)
    if hasattr(unflipped, "flip"):
        unflipped.flip = False  # the mirror images are encoded explicitly below
    if hasattr(unflipped, "draw_captions"):
        # A drawn caption would take a number from the global RNG in this process: a run that builds the cache
        # must train on the same noise as one that finds it built.
        unflipped.draw_captions = False
    # Its own generator: whether the cache had to be built must not change the training noise that follows.
    # ImageDataLoader: a corrupt image met in a worker is reported as the data's one-line error, as in training.
    loader = ImageDataLoader(unflipped, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                             generator=torch.Generator().manual_seed(0))
    parts: dict[str, list] = {"mean": [], "std": [], "labels": [], "mean_flipped": [], "std_flipped": []}
    for batch in tqdm(loader, desc="Encoding the training set into the latent cache", leave=False):
        images = batch["image"].to(device)
        mean, std = first_stage.encode_distribution(images)
        parts["mean"].append(mean.half().cpu())
        parts["std"].append(std.half().cpu())
        parts["labels"].append(batch["label"])
        if flip:
            mean, std = first_stage.encode_distribution(torch.flip(images, dims=[-1]))
            parts["mean_flipped"].append(mean.half().cpu())
            parts["std_flipped"].append(std.half().cpu())
    return {key: torch.cat(value) for key, value in parts.items() if value}


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
    """Rank 0 builds the file if it is missing (atomically); every rank then maps the same file into memory:
    pages are read on first use and shared by every process of the machine (its ranks and their loader
    workers) through the page cache, so no rank holds a private copy of the whole cache."""
    if is_global_zero and not path.is_file():
        print(f"Latent cache: encoding {what} -> {path}")
        with atomic_path(path) as tmp:
            torch.save(build(), tmp)
    elif is_global_zero:
        print(f"Latent cache: reusing {path}")
    barrier()
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_or_build_cache(first_stage, datamodule, cache_dir: Path, device: torch.device, *,
                        is_global_zero: bool, barrier, caption_embedder=None) -> tuple[LatentDataset, Path]:
    """The training split's latents (and, with ``caption_embedder``, its captions encoded) from ``cache_dir``,
    built first where missing."""
    view, data_identity = datamodule.train_dataset, datamodule.identity()
    path = Path(cache_dir) / f"latents-{cache_key(first_stage_identity(first_stage), data_identity)}.pt"
    # The data's own loader workers decode the images: in the main process, decoding a large dataset would take
    # hours, and the main process's many intra-op threads fight every other process on the node for the CPUs.
    cache = _load_or_build(path, lambda: encode_dataset(
        first_stage, view, flip=bool(getattr(datamodule, "flip", False)), batch_size=max(64, datamodule.batch_size),
        device=device, num_workers=getattr(datamodule, "num_workers", 0)), f"{len(view)} training images",
        is_global_zero=is_global_zero, barrier=barrier)
    captions = None
    if caption_embedder is not None and has_captions(view.source):
        key = cache_key({"captions": caption_embedder.cache_identity()}, data_identity)
        captions = _load_or_build(Path(cache_dir) / f"captions-{key}.pt",
                                  lambda: encode_captions(caption_embedder, view, device), "the training captions",
                                  is_global_zero=is_global_zero, barrier=barrier)
    return LatentDataset(cache, view, captions), path


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
                module.first_stage, self.images, cache_dir, module.device, is_global_zero=trainer.is_global_zero,
                barrier=trainer.strategy.barrier,
                caption_embedder=cached_caption_embedder(conditioner) if conditioner is not None else None)
        return self._latents

    def train_dataloader(self) -> DataLoader:
        latents = self.latents()
        if len(latents) < self.images.batch_size:
            raise DataError(f"data.batch_size={self.images.batch_size} is larger than the {len(latents)} cached "
                            f"training latents of {self.images.name}; lower data.batch_size or add images")
        return self.images.loader(latents, train=True)
