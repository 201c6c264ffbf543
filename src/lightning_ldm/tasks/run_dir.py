"""The run directory's records: ``config.yaml`` (the resolved config the run trains with now) and
``run_info.json`` (the command, overrides, git revision, package versions and host of the latest invocation, and
the run's history: each start, resume with the values it changed and the batch they took effect at, and end).

Written only by the process that holds the run's lock (``run_lock.py``), and for a resume only once the
checkpoint has been restored: a command that fails to resume leaves the records as they were.
"""

import json
import os
import socket
import subprocess
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lightning_ldm import atomic

_PACKAGES = ("lightning_ldm", "torchvision", "lightning", "hydra-core", "omegaconf", "torchmetrics",
             "torch-fidelity", "wandb", "safetensors", "numpy")


def git_revision(start: Path) -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=start, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=start,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("+dirty" if dirty else "")) if rev else "unknown"


def package_versions() -> dict[str, str]:
    import torch

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": str(torch.version.cuda),
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def command_line_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def command() -> str:
    program = Path(sys.argv[0]).name
    program = "python -m lightning_ldm" if program == "__main__.py" else program
    return " ".join([program, *sys.argv[1:]])


def invocation() -> dict[str, Any]:
    """What identifies this process's command."""
    return {
        "time": datetime.now().isoformat(timespec="seconds"),
        "command": command(),
        "overrides": command_line_overrides(),
        "git_revision": git_revision(Path(__file__).parent),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def read_run_info(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / "run_info.json").read_text())
    except (OSError, ValueError):
        return {}


def record_event(run_dir: Path, event: str, cfg: Optional[DictConfig] = None, **details: Any) -> None:
    """Append ``event`` (start, resume, end) to the run's history; with ``cfg``, this invocation becomes the
    run's current one: its command and versions at the top of ``run_info.json``, its config in ``config.yaml``."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    entry = {"event": event, **invocation(), **details}
    if cfg is not None:
        current = {key: entry[key] for key in ("command", "overrides", "git_revision", "host")}
        info = {**info, **current, "started": info.get("started", entry["time"]), "versions": package_versions()}
        atomic.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    else:
        entry = {key: entry[key] for key in ("event", "time", "pid")} | details
    info["history"] = [*info.get("history", []), entry]
    atomic.write_text(run_dir / "run_info.json", json.dumps(info, indent=2, default=str))


def record_run(cfg: DictConfig, run_dir: Path) -> None:
    """A task without a training state to resume (sampling, evaluation): each invocation is a start."""
    record_event(run_dir, "start", cfg)
