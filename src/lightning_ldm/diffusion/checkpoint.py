"""Load a stage-2 model from a checkpoint alone (no config file): the checkpoint carries the configs of the
first stage, UNet and schedule, and the first stage's weights travel in its state dict.

Two kinds of file are accepted: a Lightning checkpoint (``*.ckpt``, training state included) and the slim
EMA-only export (``*.safetensors``: EMA UNet + first stage + scale factor, config in the metadata).
"""

import functools
import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_ldm.atomic import atomic_path
from lightning_ldm.diffusion.legacy import upgrade_config, upgrade_state_dict
from lightning_ldm.diffusion.module import DiffusionModule
from lightning_ldm.diffusion.schedules import NoiseSchedule
from lightning_ldm.errors import CheckpointError
from lightning_ldm.latent.first_stage import rebuild_first_stage
from lightning_ldm.strict_loading import load_state_strictly
from lightning_ldm.unet.model import UNet

EXPORT_FORMAT = "lightning_ldm.diffusion"
_SET_BY_MODULE = ("in_channels", "out_channels", "context_dim", "concat_channels")


def build_module(config: dict) -> DiffusionModule:
    """A DiffusionModule with the architecture described by ``config`` (random weights)."""
    config = upgrade_config(config)
    unet_config = {k: v for k, v in config["unet"].items() if k not in _SET_BY_MODULE}
    return DiffusionModule(
        first_stage=rebuild_first_stage(config["first_stage"], config.get("sample_posterior", True)),
        unet=functools.partial(UNet, **unet_config), schedule=NoiseSchedule(**config["schedule"]),
        image_size=config["image_size"], prediction=config["prediction"], conditioning=config["conditioning"],
        sampling=config.get("sampling"))


def _first_line(error: Exception) -> str:
    """A library's error as one line (torch's unpickling errors run over many)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def load_diffusion_model(path: str, map_location: str = "cpu") -> DiffusionModule:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"stage-2 checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _load_export(path, map_location)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({_first_line(error)})") from None
    meta = checkpoint.get("lightning_ldm") if isinstance(checkpoint, dict) else None
    if not meta or meta.get("kind") != "diffusion":
        raise CheckpointError(f"{path} is not a lightning_ldm stage-2 checkpoint (it has no stage-2 config)")
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path} has a stage-2 config but no state_dict: the file is incomplete")
    module = build_module(meta["config"])
    state = checkpoint["state_dict"]
    if meta.get("version", 1) < 2:
        state = upgrade_state_dict(state, module.conditioner)
    load_state_strictly(module, state, path)
    module.batch_step = int(checkpoint.get("batch_step", 0))
    return module


def save_ema_export(module: DiffusionModule, path: Path) -> Path:
    """Slim sampling file: EMA UNet and conditioner, first stage, scale factor; config, step and non-tensor state
    (a tokenizer) in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"ema.{k}": v for k, v in module.ema.model.state_dict().items()}
    state.update({f"first_stage.{k}": v for k, v in module.first_stage.state_dict().items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    extra = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    metadata = {"format": EXPORT_FORMAT, "config": json.dumps(module.rebuild_config), "extra_state": json.dumps(extra),
                "batch_step": str(module.batch_step), "ema_updates": str(module.ema.num_updates),
                "max_steps": str(module.max_steps), "complete": str(bool(getattr(module, "reached_end", False))).lower()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _load_export(path: Path, map_location: str) -> DiffusionModule:
    try:
        with safe_open(str(path), framework="pt", device=map_location) as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise CheckpointError(f"{path} is not a safetensors file ({_first_line(error)})") from None
    if metadata.get("format") != EXPORT_FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path} is not a lightning_ldm stage-2 export (format={metadata.get('format')!r})")
    config = json.loads(metadata["config"])
    module = build_module(config)
    tensors.update(json.loads(metadata.get("extra_state", "{}")))
    if not any(k.startswith("ema.unet.") for k in tensors):  # a version-1 export: the EMA held the UNet alone
        tensors = {k.replace("ema.model.", "ema.", 1): v for k, v in upgrade_state_dict(
            {("ema.model." + k[4:] if k.startswith("ema.") else k): v for k, v in tensors.items()},
            module.conditioner).items()}
    ema_state = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
    first_state = {k[len("first_stage."):]: v for k, v in tensors.items() if k.startswith("first_stage.")}
    load_state_strictly(module.ema.model, ema_state, path)
    load_state_strictly(module.first_stage, first_state, path)
    module.trained_networks().load_state_dict(module.ema.model.state_dict())  # the export has only the averages
    module.conditioner.share_state(module.ema.model["conditioner"])
    module.batch_step = int(metadata.get("batch_step", 0))
    return module


def newest_checkpoint(search_root: Path) -> Optional[Path]:
    candidates = list(Path(search_root).glob("diffusion/**/checkpoints/last.ckpt"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
