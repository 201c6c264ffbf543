"""Resuming a run: which checkpoint, and whether this command may continue it.

A checkpoint carries the resolved config of the run that wrote it (``run_config``). A resumed command is
compared with it key by key: values that define the model or its training problem (architecture, prediction
target, schedule, data, seed, ...) cannot change, and a difference stops the run in one line before anything
is loaded or written; values a running experiment may change (length, learning rate, logging, callbacks, the
trainer's devices) are applied and recorded as changes in the run's history.
"""

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_only

from lightning_ldm.errors import CheckpointError, ConfigError

# Keys that do not describe the training run (where it is written, the other stages' options).
IGNORED = ("paths.*", "run_name", "resume", "sample.*", "evaluate.*", "benchmark.*")
# Keys a resumed run may change; they take effect from the batch it resumes at. module.sampler* and
# module.guidance_scale are the sampling keys of runs recorded before module.sampling was one node.
CHANGEABLE = ("max_steps", "max_train_seconds", "module.max_steps", "module.max_train_seconds", "module.lr",
              "module.grad_clip_norm", "module.image_log_every", "module.num_log_images", "module.compile",
              "module.cuda_graphs", "module.sampling.*", "module.sampler", "module.sampler_steps",
              "module.sampler_eta", "module.guidance_scale", "logger", "logger.*", "callbacks", "callbacks.*",
              "trainer.*", "tags", "experiment_name", "float32_matmul_precision", "data.num_workers", "data.pin_memory",
              "data.persistent_workers", "data.prefetch_factor")


@dataclass
class ResumePlan:
    checkpoint: str
    at_batch: int
    changes: dict[str, list] = field(default_factory=dict)  # key -> [value in the run, value now]


def resume_checkpoint(resume: Optional[str], run_dir: Path) -> Optional[str]:
    """``resume=auto``: the run directory's last checkpoint if there is one; a path must exist."""
    if resume is None:
        return None
    if resume == "auto":
        # last.ckpt, or a newer SLURM requeue checkpoint (Lightning writes hpc_ckpt_<n>.ckpt on SIGUSR1).
        candidates = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        if not candidates:
            return None
        newest = max(candidates, key=lambda p: p.stat().st_mtime)
        if rank_zero_only.rank == 0:
            print(f"Resuming from {newest}")
        return str(newest)
    if not Path(resume).is_file():
        raise CheckpointError(f"resume={resume}: no such checkpoint file")
    return resume


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        flat = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def read_checkpoint_config(path: str) -> tuple[Optional[dict], Optional[str], int]:
    """(the run config, the stage that wrote it, its batch) of a checkpoint, read without loading its tensors."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:
        lines = str(error).strip().splitlines()
        raise CheckpointError(f"resume: {path} cannot be read as a checkpoint "
                              f"({type(error).__name__}: {lines[0] if lines else ''})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"resume: {path} is not a Lightning checkpoint")
    config = checkpoint.get("run_config")
    stage = (config or {}).get("task", {}).get("name")
    if stage is None and isinstance(checkpoint.get("lightning_ldm"), dict):  # checkpoints written before run_config
        stage = checkpoint["lightning_ldm"].get("kind")
    return config, stage, int(checkpoint.get("batch_step", 0))


def _show(value: Any) -> str:
    return "unset" if value is _MISSING else repr(value) if isinstance(value, str) else str(value)


_MISSING = object()


def plan_resume(checkpoint: str, resolved: dict) -> ResumePlan:
    """Compare this command's resolved config with the checkpoint's: raise on a value that cannot change."""
    config, stage, at_batch = read_checkpoint_config(checkpoint)
    this_stage = resolved["task"]["name"]
    if stage is not None and stage != this_stage:
        raise ConfigError(f"resume={checkpoint} is a checkpoint of stage={stage}, and this is stage={this_stage}"
                          + ("; stage 2 loads a stage-1 model through autoencoder.path=<run>/export/autoencoder.safetensors"
                             if stage == "autoencoder" else ""))
    if config is None:
        print(f"Resume: {checkpoint} carries no run config (an older version wrote it): changed values are not checked")
        return ResumePlan(checkpoint, at_batch)
    before, now = flatten(config), flatten(resolved)
    frozen, changes = [], {}
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key, _MISSING), now.get(key, _MISSING)
        if old == new or _matches(key, IGNORED):
            continue
        if _matches(key, CHANGEABLE):
            changes[key] = [None if old is _MISSING else old, None if new is _MISSING else new]
        else:
            frozen.append(f"{key} {_show(old)} -> {_show(new)}")
    if frozen:
        shown = "; ".join(frozen[:6]) + (f"; and {len(frozen) - 6} more" if len(frozen) > 6 else "")
        raise ConfigError(f"resume: this command changes what the run at batch {at_batch} was trained with ({shown}); "
                          "these cannot change when resuming: set them back, or start a new run (another run_name)")
    return ResumePlan(checkpoint, at_batch, changes)
