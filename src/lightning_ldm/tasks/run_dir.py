"""The run directory: resolved config, overrides, git revision and package versions beside the results."""

import json
import subprocess
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

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


def record_run(cfg: DictConfig, run_dir: Path) -> None:
    """Write ``run_info.json`` and ``config.yaml`` (fully resolved) into the run directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "started": datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "git_revision": git_revision(Path(__file__).parent),
        "versions": package_versions(),
    }
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
