"""Reference statistics of the real images, computed once and cached on disk.

The images are the data module's own split views with the random flip switched off: the same decoding, crop,
resize, channel conversion and [-1, 1] scaling as the training loader, then the same 8-bit quantisation as the
samples (FID is off by 2-3x when reference images are preprocessed differently from the training images).
Either split can be the reference: the training images (FID's usual convention) or the held-out validation
images, the honest choice for an extractor trained on the training split (``split_view``).

The cache file ``<cache_dir>/<data>-<split>-<n>-<label>-<hash>.npz`` holds mu, sigma, its square root, n, the
key as JSON and, when KID or precision/recall need them, the features. The key is the data identity
(``datamodule.identity()``: source, size, channels, resize filter, split rule...), the split, which images
(count and subset rule) and the extractor (name, layer, weights SHA-256): change any of them and the file name
changes, so the statistics are recomputed; keep them and the file is reused without running the extractor.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm import tqdm

from lightning_ldm.atomic import atomic_path
from lightning_ldm.errors import ConfigError
from lightning_ldm.distributed import all_reduce, broadcast_object, gather_rows, rank_and_world, shard
from lightning_ldm.metrics.features import FeatureExtractor
from lightning_ldm.metrics.frechet import GaussianStatistics
from lightning_ldm.metrics.moments import FeatureMoments

CACHE_VERSION = 1
SUBSET_SEED = 0


@dataclass
class Reference:
    statistics: GaussianStatistics
    features: Optional[torch.Tensor]  # (n, D) float32 when kept for KID / precision-recall
    key: dict[str, Any]
    digest: str  # SHA-256 of the key: names the file and identifies the statistics in reports
    path: Path
    reused: bool


def unflipped(dataset: Dataset) -> Dataset:
    """The same view of the data without the random horizontal flip (the reference must be deterministic)."""
    from lightning_ldm.data.base import SplitView

    if isinstance(dataset, SplitView):
        return SplitView(dataset.source, dataset.indices, flip=False, skip_corrupt=dataset.skip_corrupt)
    if getattr(dataset, "flip", False):
        raise TypeError(f"{type(dataset).__name__} flips images at random; give the reference an unflipped view")
    return dataset


def split_view(datamodule, split: str, config_key: str, *, whole_streams: bool = False) -> Dataset:
    """The unflipped view of a set-up data module's ``split`` ("train" or "val"): the images exactly as its
    loader preprocesses them, without the random flip. Fewer than 2 images is a configuration error. Streamed
    shards cannot be indexed: callers that take a split whole (reference statistics) say ``whole_streams``."""
    if split not in ("train", "val"):
        raise ConfigError(f"{config_key}={split!r}: use train or val")
    view = datamodule.train_dataset if split == "train" else datamodule.val_dataset
    if getattr(datamodule, "streams", False):
        if not whole_streams:
            raise ConfigError(f"{config_key}: this evaluation picks images by index, which streamed shards "
                              "(data=shards) cannot give; evaluate on a folder or zip of the same images (data=folder)")
        if view is None:
            raise ConfigError(f"{config_key}={split}: data.val_urls names no validation shards; set data.val_urls or "
                              f"{config_key}=train")
        return view.in_order()  # every sample once, in shard order, unflipped: the whole split is the reference
    count = 0 if view is None else len(view)
    if count < 2:
        fraction = getattr(datamodule, "val_fraction", None)
        why = (f"data.val_fraction={fraction} holds out no images; set data.val_fraction > 0 (e.g. 0.1) or "
               f"{config_key}=train") if split == "val" and not fraction else "Frechet distances need at least 2"
        raise ConfigError(f"{config_key}={split}: the {split} split has {count} image(s); {why}")
    return unflipped(view)


def reference_indices(total: int, count: Optional[int]) -> list[int]:
    """All images, or a fixed random subset of ``count`` (a prefix could be a few classes of a sorted set)."""
    if count is None or count >= total:
        return list(range(total))
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(SUBSET_SEED))[:count]
    return sorted(chosen.tolist())


def reference_key(identity: dict, split: str, count, total, extractor: FeatureExtractor) -> dict:
    described = {k: v for k, v in extractor.describe().items() if k != "file"}  # the hash names the weights
    subset = "all" if count == "all" or count >= total else f"randperm(seed={SUBSET_SEED})"
    return {"version": CACHE_VERSION, "data": identity, "split": split,
            "images": {"count": count, "of": total, "subset": subset},
            "preprocessing": "data-module view without random flip, 8-bit quantised", "extractor": described}


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def cache_path(cache_dir: Path, key: dict) -> Path:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(key["data"].get("name", "data")))
    label = key["extractor"]["label"]
    return Path(cache_dir) / f"{name}-{key['split']}-{key['images']['count']}-{label}-{key_digest(key)[:16]}.npz"


def _my_images(dataset: Dataset, indices: Optional[list[int]], batch_size: int, num_workers: int) -> DataLoader:
    """This rank's share of the reference images: its block of ``indices``, or, for a stream (``indices`` None),
    the shards the stream itself assigns to this rank and its workers."""
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    rank, world = rank_and_world()
    mine = [indices[i] for i in shard(len(indices), rank, world)]
    return DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, num_workers=num_workers)


@torch.no_grad()
def dataset_features(dataset: Dataset, indices: Optional[list[int]], extractor: FeatureExtractor, batch_size: int,
                     num_workers: int = 0) -> torch.Tensor:
    """Features of ``dataset[indices]``; each rank extracts its block, every rank gets all (in index order; a
    stream's in the order of its ranks' shares)."""
    loader = _my_images(dataset, indices, batch_size, num_workers)
    chunks = [extractor(batch["image"].to(extractor.device))["features"] for batch in loader]
    local = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.float32, device=extractor.device)
    return gather_rows(local)


@torch.no_grad()
def streamed_statistics(dataset: Dataset, indices: Optional[list[int]], extractor: FeatureExtractor, batch_size: int,
                        num_workers: int = 0) -> Optional[GaussianStatistics]:
    """Statistics of ``dataset[indices]`` (a stream: all of it) by streaming moments: each rank its share, sums
    all-reduced; on rank 0 (None elsewhere)."""
    rank, _ = rank_and_world()
    loader = _my_images(dataset, indices, batch_size, num_workers)
    moments = None
    for batch in tqdm(loader, desc="reference features", disable=rank != 0, leave=False):
        features = extractor(batch["image"].to(extractor.device))["features"]
        moments = moments or FeatureMoments(features.shape[1], features.device)
        moments.update(features)
    # A rank with no images (fewer images than ranks) still joins the collective, at the others' width.
    width = all_reduce(torch.tensor([0 if moments is None else moments.total.shape[0]]), dist.ReduceOp.MAX,
                       extractor.device)
    reduced = (moments or FeatureMoments(int(width), extractor.device)).all_reduced()
    return reduced.statistics() if rank == 0 else None


def load_or_compute_reference(dataset: Dataset, *, identity: dict, extractor: FeatureExtractor, cache_dir: Path,
                              split: str = "train", count: Optional[int] = None, batch_size: int = 64,
                              keep_features: bool = False, num_workers: int = 0,
                              log: Callable[[str], None] = print) -> Optional[Reference]:
    """The reference on rank 0 (None on other ranks, which only help extracting); call it on every rank. A stream
    (shards, which cannot be indexed) is used whole."""
    if isinstance(dataset, IterableDataset):
        if count is not None:
            raise ConfigError(f"reference_num_images={count}: streamed shards give their whole split as the "
                              "reference; set it to null, or name fewer shards in data.val_urls")
        indices, total, how_many = None, "all", "all"
    else:
        indices = reference_indices(len(dataset), count)
        total, how_many = len(dataset), len(indices)
    key = reference_key(identity, split, how_many, total, extractor)
    path = cache_path(cache_dir, key)
    rank, _ = rank_and_world()
    cached = _load(path, key, keep_features) if rank == 0 else None
    if broadcast_object(cached is not None):
        if rank == 0:
            log(f"Reference statistics: reusing {path} ({cached.statistics.n} {split} images, {extractor.label})")
        return cached
    if rank == 0:
        log(f"Reference statistics: extracting {extractor.label} features of {how_many} {split} images -> {path}")
    features = None
    if keep_features:  # KID and precision/recall compare feature sets, not statistics: gather the rows
        features = dataset_features(dataset, indices, extractor, batch_size, num_workers)
        statistics = GaussianStatistics.from_features(features) if rank == 0 else None
    else:
        statistics = streamed_statistics(dataset, indices, extractor, batch_size, num_workers)
    if rank != 0:
        return None
    statistics.root()  # computed once here and stored, never again per evaluation
    reference = Reference(statistics, features, key, key_digest(key), path, reused=False)
    _save(reference)
    return reference


def _save(reference: Reference) -> None:
    stats = reference.statistics
    arrays = {"mu": stats.mu.cpu().numpy(), "sigma": stats.sigma.cpu().numpy(), "n": np.array(stats.n),
              "sqrt_sigma": stats.root().cpu().numpy(), "key": np.array(json.dumps(reference.key, default=str))}
    if reference.features is not None:
        arrays["features"] = reference.features.cpu().numpy()
    with atomic_path(reference.path) as tmp, open(tmp, "wb") as handle:  # a file object: savez adds no suffix
        np.savez(handle, **arrays)


def _load(path: Path, key: dict, need_features: bool) -> Optional[Reference]:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if json.loads(str(data["key"])) != json.loads(json.dumps(key, default=str)):
                return None
            if need_features and "features" not in data:
                return None
            stats = GaussianStatistics(torch.from_numpy(data["mu"]), torch.from_numpy(data["sigma"]), int(data["n"]),
                                       sqrt_sigma=torch.from_numpy(data["sqrt_sigma"]))
            features = torch.from_numpy(data["features"]) if "features" in data else None
    except (OSError, ValueError, KeyError):
        return None  # unreadable or from another version: recompute and overwrite
    return Reference(stats, features, key, key_digest(key), path, reused=True)
