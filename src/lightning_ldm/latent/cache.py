"""Cached latents (as EDM2 and fast-DiT do): encode the training set once, then train from the cache so the
encoder costs nothing per step.

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

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from lightning_ldm.atomic import atomic_path
from lightning_ldm.data.base import ImageDataLoader, has_captions

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
    """Cached (mean, std, label) per image; with flips, a random one of the two stored orientations. Captions are
    not cached: they come from the image view's source by index (text, no decoding), drawn as the view draws
    them, and mirrored with the mirrored latent; the tokenizer runs on them per batch."""

    def __init__(self, cache: dict, captions_from: Optional[Dataset] = None) -> None:
        self.mean, self.std, self.labels = cache["mean"], cache["std"], cache["labels"]
        self.view = captions_from if captions_from is not None and has_captions(
            getattr(captions_from, "source", None)) else None
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
        if self.view is not None:
            item["caption"] = self.view.caption(self.view.indices[index], mirrored)
        return item


@torch.no_grad()
def encode_dataset(first_stage, dataset: Dataset, *, flip: bool, batch_size: int, device: torch.device,
                   num_workers: int = 0) -> dict:
    unflipped = copy.copy(dataset)
    if hasattr(unflipped, "flip"):
        unflipped.flip = False  # the mirror images are encoded explicitly below
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


def load_or_build_cache(first_stage, datamodule, cache_dir: Path, device: torch.device, *,
                        is_global_zero: bool, barrier) -> tuple[LatentDataset, Path]:
    """Rank 0 builds the cache if it is missing (atomically); every rank then loads the same file."""
    data_identity = datamodule.identity()
    key = cache_key(first_stage_identity(first_stage), data_identity)
    path = Path(cache_dir) / f"latents-{key}.pt"
    if is_global_zero and not path.is_file():
        print(f"Latent cache: encoding {len(datamodule.train_dataset)} training images -> {path}")
        # The data's own loader workers decode the images: in the main process, decoding a large dataset would take
        # hours, and the main process's many intra-op threads fight every other process on the node for the CPUs.
        cache = encode_dataset(first_stage, datamodule.train_dataset, flip=bool(getattr(datamodule, "flip", False)),
                               batch_size=max(64, datamodule.batch_size), device=device,
                               num_workers=getattr(datamodule, "num_workers", 0))
        with atomic_path(path) as tmp:
            torch.save(cache, tmp)
    elif is_global_zero:
        print(f"Latent cache: reusing {path}")
    barrier()
    return LatentDataset(torch.load(path, map_location="cpu", weights_only=True), datamodule.train_dataset), path
