"""The package as users install it: a wheel that carries its configs and data and runs from any directory, the
dependencies it declares, and the extras that optional features name when they are missing."""

import email
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, assert_one_line_error, run_cli
from lightning_ldm.cli import CONFIG_DIR

TINY_STAGE_1 = ["stage=autoencoder", "trainer=cpu", "logger=csv", "max_steps=2", "data.batch_size=4",
                "trainer.limit_val_batches=1", "run_name=from-the-wheel"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of the sources (a build in the checkout would leave build/ behind)."""
    source = tmp_path_factory.mktemp("source")
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "local"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(out), str(source)], check=True, capture_output=True)
    (built,) = out.glob("lightning_ldm-*.whl")
    return built


def test_the_wheel_carries_every_config_and_the_embedded_digits(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"lightning_ldm/conf/{p.relative_to(CONFIG_DIR).as_posix()}" for p in CONFIG_DIR.rglob("*.yaml")
               if p.relative_to(CONFIG_DIR).parts[0] != "local"}
    assert len(configs) > 50 and configs <= names
    assert not any(name.startswith("lightning_ldm/conf/local/") for name in names)
    assert {"lightning_ldm/data/embedded/mnist_5k.csv.gz", "lightning_ldm/data/embedded/README.md",
            "hydra_plugins/lightning_ldm_sweeper/optuna_sweeper.py"} <= names


def test_the_wheel_declares_the_core_dependencies_and_the_extras(wheel):
    with zipfile.ZipFile(wheel) as archive:
        info = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(info))
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    requires = metadata.get_all("Requires-Dist")
    core = {r.split(";")[0].split(">")[0].split("<")[0].split("=")[0].strip() for r in requires if "extra ==" not in r}
    assert {"torch", "lightning", "hydra-core", "torchmetrics", "wandb"} <= core
    assert not core & {"mlxtend", "lpips", "optuna", "hydra-submitit-launcher", "tensorboard", "pandas",
                       "scikit-learn", "pytest"}
    for extra, package in (("sweeps", "optuna"), ("slurm", "hydra-submitit-launcher"),
                           ("tensorboard", "tensorboard")):
        assert any(r.startswith(package) and f'extra == "{extra}"' in r for r in requires), (extra, requires)
    assert set(metadata.get_all("Provides-Extra")) >= {"sweeps", "slurm", "tensorboard", "all", "test"}
    assert "lightning-ldm = lightning_ldm.__main__:main" in entry_points


def test_the_installed_wheel_trains_from_another_directory(wheel, tmp_path):
    """A fresh virtual environment with the wheel installed by pip, its dependencies lent by this environment
    through a .pth file (installing torch again would take minutes), runs the console script elsewhere."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    lent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "lent_dependencies.pth").write_text("\n".join(sorted(lent)) + "\n")  # .pth files there are not run
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", "--disable-pip-version-check", str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import lightning_ldm.cli as c; print(c.CONFIG_DIR)"], cwd=elsewhere,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the wheel's copy, not the checkout's
    result = subprocess.run([str(venv / "bin" / "lightning-ldm"), *TINY_STAGE_1], cwd=elsewhere, capture_output=True,
                            text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                                         "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = elsewhere / "outputs" / "autoencoder" / "from-the-wheel"
    assert (run_dir / "export" / "autoencoder.safetensors").is_file() and (run_dir / "config.yaml").is_file()


@pytest.mark.parametrize("hidden, command, extra", [
    ("optuna", ["-m", "hparams_search=optuna_lr"], "sweeps"),
    ("hydra_plugins.hydra_submitit_launcher", ["-m", "hydra/launcher=slurm"], "slurm"),
    ("tensorboard", ["logger=tensorboard"], "tensorboard"),
])
def test_a_feature_without_its_extra_names_the_extra(tmp_path, hidden, command, extra):
    """The extra's package made unimportable (as if never installed): one line naming the extra, nothing run."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(f"import sys\nsys.modules[{hidden!r}] = None\n")
    result = run_cli(*command, "stage=autoencoder", "trainer=cpu", "max_steps=1", cwd=tmp_path,
                     env={"PYTHONPATH": str(hide)})
    assert_one_line_error(result, f'pip install "lightning_ldm[{extra}]"')
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.ckpt"))


def test_requirements_txt_lists_the_core_dependencies_of_pyproject():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line and line[0] != "#"]
    assert listed == declared
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in (REPO / "constraints.txt").read_text().split()}
    assert {d.split(">")[0].split("<")[0].split("=")[0].lower() for d in declared} <= pinned  # all locked
