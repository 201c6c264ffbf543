"""Reading model files: what a lightning_ldm file is, and the tensors of any torch or safetensors checkpoint."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch

from lightning_ldm.errors import CheckpointError

# The "format" metadata of our safetensors exports -> the stage that wrote them.
EXPORT_KINDS = {"lightning_ldm.diffusion": "diffusion", "lightning_ldm.autoencoder": "autoencoder"}


def resolve_model_file(source: Union[str, Path]) -> Path:
    """A file, or the file a run directory's model lives in: a stage-2 run's EMA export (else its last
    checkpoint), a stage-1 run's autoencoder export."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist: give a run directory, a stage-2 checkpoint or export "
                              "(.ckpt, ldm-ema.safetensors) or a stage-1 export (autoencoder.safetensors)")
    for candidate in ("export/ldm-ema.safetensors", "checkpoints/last.ckpt", "export/autoencoder.safetensors"):
        if (path / candidate).is_file():
            return path / candidate
    raise CheckpointError(f"{path} holds no model: a run directory has export/ldm-ema.safetensors, "
                          "checkpoints/last.ckpt (stage 2) or export/autoencoder.safetensors (stage 1)")


def safetensors_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata, or one CheckpointError line if it cannot be read as one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as error:
        raise CheckpointError(f"{path} is not a safetensors file ({type(error).__name__})") from None


def model_kind(path: Path, key: str) -> str:
    """"diffusion" (a stage-2 .ckpt or EMA export) or "autoencoder" (a stage-1 export), from the file itself; ``key``
    names the setting that gave the path, for the error line."""
    if not path.is_file():
        raise CheckpointError(f"{key}={path}: no such file")
    if path.suffix != ".safetensors":
        return "diffusion"
    form = safetensors_metadata(path).get("format")
    if form not in EXPORT_KINDS:
        raise CheckpointError(f"{path} is neither a stage-1 nor a stage-2 lightning_ldm export (format={form!r})")
    return EXPORT_KINDS[form]


def torch_load(path: Path) -> Any:
    """torch.load on the CPU, memory-mapped where the file allows it (zip format): tensors are read when used."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=False)


def read_weights(path: Path) -> Mapping[str, Any]:
    """The state dict in a torch checkpoint (its ``state_dict`` entry, or the dict itself) or a safetensors file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:
            raise CheckpointError(f"{path} is not a safetensors file ({type(error).__name__})") from None
    try:
        checkpoint = torch_load(path)
    except Exception as error:
        raise CheckpointError(f"{path} could not be read as a torch checkpoint ({type(error).__name__})") from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return state
