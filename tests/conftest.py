import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_ldm.cli import CONFIG_DIR, register_resolvers

REPO = Path(__file__).resolve().parents[1]

# pytest-xdist runs one worker per core: one thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _own_cache(tmp_path_factory):
    """Folder indexes (and anything else kept under $LIGHTNING_LDM_CACHE) go to a temporary folder, not ~/.cache;
    set in the environment, so the command-line runs of the tests inherit it."""
    os.environ["LIGHTNING_LDM_CACHE"] = str(tmp_path_factory.mktemp("lightning_ldm_cache"))


@pytest.fixture
def compose(tmp_path):
    """Compose the real config tree through Hydra's compose API, as the entry point would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    register_resolvers()

    def _compose(*overrides: str):
        base = [f"paths.output_root={tmp_path}", f"paths.run_dir={tmp_path / 'run'}"]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose("config", overrides=[*base, *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    return _compose


@pytest.fixture
def with_callback(monkeypatch):
    """``with_callback(cb)``: every trainer that ``tasks.train.fit`` builds in this test also runs ``cb``."""
    from lightning_ldm.tasks import train as train_task

    def add(callback) -> None:
        build = train_task.build_trainer

        def build_with_callback(cfg, run_dir, **kwargs):
            trainer = build(cfg, run_dir, **kwargs)
            trainer.callbacks.append(callback)
            return trainer

        monkeypatch.setattr(train_task, "build_trainer", build_with_callback)

    return add


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600,
            module: str = "lightning_ldm") -> subprocess.CompletedProcess:
    """Run ``python -m lightning_ldm`` (or another ``module``) as a user would, offline, without W&B credentials."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    full_env.update({"WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                     "NETRC": str(cwd / "no-netrc"), "TORCH_HOME": str(cwd / "torch-home")})
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed with exit status 2, no traceback, and a single ``error:`` line naming the problem."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


_TORCH_CONFIGS = ("torch._dynamo.config", "torch._inductor.config")


@pytest.fixture(autouse=True)
def torch_config_left_as_found():
    """Every test leaves torch's compiler settings as it found them: change them only through their own
    ``config.patch(...)``. (pytest's monkeypatch cannot restore them: its undo deletes the key.)"""
    import importlib

    modules = [importlib.import_module(name) for name in _TORCH_CONFIGS]
    before = [module.get_config_copy() for module in modules]
    yield
    for name, module, old in zip(_TORCH_CONFIGS, modules, before):
        new = module.get_config_copy()
        changed = sorted(key for key in old.keys() | new.keys() if key not in old or key not in new
                         or old[key] != new[key])
        assert not changed, f"{name} changed by this test: {changed}"
