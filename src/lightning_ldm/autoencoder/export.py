"""The inference-only stage-1 export that stage 2 loads: encoder, decoder and regulariser weights as
safetensors, with the architecture config, the data identity and the metrics in the file's metadata.

No discriminator, no LPIPS, no optimiser state: the file is exactly what sampling and encoding need. It is
written atomically (temporary file + rename), so a crash while saving never leaves a broken export.
"""

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_ldm.atomic import atomic_path
from lightning_ldm.autoencoder.model import Autoencoder
from lightning_ldm.errors import CheckpointError
from lightning_ldm.file_format import safetensors_metadata
from lightning_ldm.strict_loading import load_state_strictly

EXPORT_FORMAT = "lightning_ldm.autoencoder"
EXPORT_VERSION = "1"


def save_autoencoder_export(model: Autoencoder, path: Path, *, data: Optional[dict] = None,
                            info: Optional[dict] = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "config": json.dumps(model.config),
        "data": json.dumps(data or {}),
        "info": json.dumps(info or {}),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_export_metadata(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"autoencoder export not found: {path}")
    metadata = safetensors_metadata(path)
    if metadata.get("format") != EXPORT_FORMAT:
        raise CheckpointError(
            f"{path} is not a lightning_ldm autoencoder export (format={metadata.get('format')!r}); "
            "stage 1 writes one to <run>/export/autoencoder.safetensors")
    return {key: json.loads(metadata[key]) for key in ("config", "data", "info")}


def load_autoencoder_export(path: Path, map_location: str = "cpu") -> tuple[Autoencoder, dict[str, Any]]:
    """Rebuild the autoencoder from its export; every weight must be present with the right shape."""
    metadata = read_export_metadata(path)
    try:
        model = Autoencoder(**metadata["config"])
    except TypeError as error:
        raise CheckpointError(f"{path}: its config does not fit this version's Autoencoder ({error})") from None
    state = {}
    with safe_open(str(path), framework="pt", device=map_location) as handle:
        for key in handle.keys():
            state[key] = handle.get_tensor(key)
    load_state_strictly(model, state, path)
    return model, metadata
