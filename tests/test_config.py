"""Every config file composes and passes the schema; the schema rejects unknown keys and wrong types."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import run_cli
from lightning_ldm.cli import CONFIG_DIR
from lightning_ldm.config.validate import validate_config
from lightning_ldm.errors import ConfigError

# Options that need a value the default config cannot provide.
_NEEDS = {
    ("data", "folder"): ["data.root=/tmp/images"],
    ("data", "mnist"): ["data.root=/tmp/mnist"],
    ("data", "fashion_mnist"): ["data.root=/tmp/fashion"],
    ("data", "cifar10"): ["data.root=/tmp/cifar"],
    ("data", "shards"): ["data.urls=/tmp/shards"],
}
_STAGE_OF_GROUP = {"data": "autoencoder", "autoencoder": "autoencoder", "loss": "autoencoder",
                   "unet": "diffusion", "schedule": "diffusion", "conditioning": "diffusion"}
_STAGE_OF_OPTION = {("autoencoder", "export"): "diffusion", ("autoencoder", "identity"): "diffusion",
                    ("callbacks", "diffusion"): "diffusion"}


def _options():
    # experiment/, debug/ and hparams_search/ presets have their own tests (test_presets.py, test_sweeps.py).
    skip = ("hydra", "local", "experiment", "debug", "hparams_search")
    for group_dir in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name not in skip):
        for yaml in sorted(group_dir.glob("*.yaml")):
            yield group_dir.name, yaml.stem


@pytest.mark.parametrize("group,option", list(_options()))
def test_every_config_option_composes_and_validates(compose, group, option):
    stage = _STAGE_OF_OPTION.get((group, option), _STAGE_OF_GROUP.get(group))
    overrides = ([f"stage={stage}"] if stage and group != "stage" else []) + [f"{group}={option}"]
    cfg = compose(*overrides, *_NEEDS.get((group, option), []))
    validate_config(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("preset", ["kl-f2-small", "kl-f4-small", "vq-f4-small"])
def test_small_autoencoder_presets_instantiate(compose, preset):
    cfg = compose("stage=autoencoder", f"autoencoder={preset}")
    model = instantiate(cfg.autoencoder)
    assert model.config["in_channels"] == cfg.data.channels


def _error(compose, *overrides) -> str:
    cfg = compose(*overrides)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_top_level_key_is_named(compose):
    assert _error(compose, "+max_step=3").startswith("max_step: unknown config key (did you mean 'max_steps'?)")


def test_unknown_key_of_an_instantiated_node_is_named(compose):
    message = _error(compose, "+data.batch_sze=3")
    assert message.startswith("data.batch_sze: unknown key for lightning_ldm.data.digits.DigitsDataModule")
    assert "did you mean 'batch_size'" in message


def test_wrong_types_are_named(compose):
    assert _error(compose, "data.batch_size=abc") == "data.batch_size: expected int, got str 'abc'"
    assert _error(compose, "autoencoder.ch_mult=[1,x]").startswith("autoencoder.ch_mult: expected")
    assert _error(compose, "autoencoder.regularizer=gauss").startswith(
        "autoencoder.regularizer: expected one of 'kl', 'vq'")
    assert _error(compose, "module.lr=fast") == "module.lr: expected float, got str 'fast'"


def precision_seen_by_the_task(cfg):
    return torch.get_float32_matmul_precision()


@pytest.mark.parametrize("value", ["highest", "medium"])
def test_float32_matmul_precision_is_set_before_the_task_runs(compose, value):
    from lightning_ldm.__main__ import _main

    cfg = compose(f"float32_matmul_precision={value}")
    cfg.task.run = f"{__name__}.precision_seen_by_the_task"
    before = torch.get_float32_matmul_precision()
    try:
        assert _main(cfg) == value  # hydra.main passes a given config straight to the function
    finally:
        torch.set_float32_matmul_precision(before)
    assert _error(compose, "float32_matmul_precision=fast").startswith(
        "float32_matmul_precision: expected one of 'highest', 'high', 'medium'")


def test_int_is_accepted_where_float_is_expected(compose):
    validate_config(compose("module.lr=1"))


def test_missing_required_value_is_named(compose):
    assert _error(compose, "data=folder").startswith("data.root: required value is not set")


def test_a_typo_inside_a_user_yaml_is_caught(compose, tmp_path):
    experiment = tmp_path / "my_experiment.yaml"
    experiment.write_text("# @package _global_\nloss:\n  disc_strat: 5\n")
    cfg = compose()
    OmegaConf.set_struct(cfg, False)
    bad = OmegaConf.merge(cfg, OmegaConf.load(experiment))
    with pytest.raises(ConfigError, match=r"loss.disc_strat: unknown key .*did you mean 'disc_start'"):
        validate_config(bad)


def test_configs_are_package_data_and_the_repositorys_conf_is_them():
    import lightning_ldm

    assert CONFIG_DIR == Path(lightning_ldm.__file__).resolve().parent / "conf"
    assert (CONFIG_DIR / "config.yaml").is_file()
    assert (Path(__file__).resolve().parents[1] / "conf").resolve() == CONFIG_DIR


def test_a_users_config_directory_adds_presets_and_overrides(tmp_path):
    """Hydra's search path: --config-dir puts the user's directory before the package's configs, so it can add
    presets to any group and override the package's own (docs: README, "Your own configs")."""
    mine = tmp_path / "my_configs"
    (mine / "experiment").mkdir(parents=True)
    (mine / "experiment" / "my-digits.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /unet: small\nmax_steps: 123\nexperiment_name: mine\n")
    (mine / "local").mkdir()
    (mine / "local" / "default.yaml").write_text("# @package _global_\nseed: 77\n")
    result = run_cli("--config-dir", str(mine), "stage=diffusion", "experiment=my-digits", "--cfg", "job",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = OmegaConf.create(result.stdout)
    assert (printed.max_steps, printed.experiment_name, printed.seed) == (123, "mine", 77)
    assert printed.unet.model_channels == 128  # unet=small, chosen by the user's preset

