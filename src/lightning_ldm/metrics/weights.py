"""Where the weights of torch-fidelity's feature extractors come from: a configured path, or the file torch
hub would have downloaded, already in its cache. Never the network: a missing file stops the run at start
with one line naming the file, where it was looked for and how to get it.

torch-fidelity downloads with ``torch.hub.load_state_dict_from_url``, which keeps the file under
``torch.hub.get_dir()/checkpoints/<basename of the URL>``; we look there under the same name, and hand the
path to torch-fidelity's own loading code (its ``feature_extractor_weights_path``).
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lightning_ldm.errors import ConfigError, MissingWeightsError

INCEPTION = "inception-v3-compat"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
# The converted TF Inception (2015-12-05) of the FID paper; pytorch-fid ships the very same bytes as
# pt_inception-2015-12-05-6726825d.pth, so either name is accepted.
STANDARD_INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


@dataclass(frozen=True)
class HubFile:
    url: str
    filename: str
    aliases: tuple[str, ...] = ()


def hub_file(name: str) -> HubFile:
    """The file torch-fidelity would download for extractor ``name``."""
    if name == INCEPTION:
        return HubFile(INCEPTION_URL, os.path.basename(INCEPTION_URL), ("pt_inception-2015-12-05-6726825d.pth",))
    if name == "vgg16":  # torchvision's VGG16_Weights.IMAGENET1K_V1, loaded by torch-fidelity as a state dict
        url = "https://download.pytorch.org/models/vgg16-397923af.pth"
        return HubFile(url, os.path.basename(url))
    if name.startswith("clip-"):
        from torch_fidelity.feature_extractor_clip import MODEL_METADATA, MODEL_URLS

        if name in MODEL_METADATA:
            return HubFile(MODEL_URLS[name], f"{name}-{MODEL_METADATA[name]['hash']}.pt")
    if name.startswith("dinov2-"):
        raise ConfigError(f"feature extractor {name}: torch-fidelity fetches its code and weights from GitHub at "
                          "run time, which this project never does; save the network as TorchScript and use "
                          "feature_extractor.kind=checkpoint")
    raise ConfigError(f"feature extractor {name}: unknown to torch-fidelity {_version()}; use one of "
                      f"{', '.join(torch_fidelity_names())}")


def torch_fidelity_names() -> list[str]:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    return [n for n in FEATURE_EXTRACTORS_REGISTRY if not n.startswith("dinov2-")]


def _version() -> str:
    import torch_fidelity

    return torch_fidelity.__version__


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def locate_weights(name: str, weights_path: Optional[str], config_key: str) -> Path:
    """The local weights file of torch-fidelity extractor ``name``, or MissingWeightsError (one line)."""
    wanted = hub_file(name)
    if weights_path:
        path = Path(weights_path).expanduser()
        if path.is_file():
            return path.resolve()
        raise MissingWeightsError(f"{config_key}.weights_path={weights_path}: no such file (it should be "
                                  f"{wanted.filename}, from {wanted.url})")
    folder = hub_checkpoint_dir()
    for filename in (wanted.filename, *wanted.aliases):
        if (folder / filename).is_file():
            return (folder / filename).resolve()
    raise MissingWeightsError(
        f"{name} needs the weights file {wanted.filename}, which is not in {folder} and is never downloaded by "
        f"this project: fetch {wanted.url} on a machine with internet and copy it into that folder, or set "
        f"{config_key}.weights_path=/path/to/{wanted.filename}")


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, computed once per process for an unchanged file (it keys the reference caches)."""
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]
