"""The W&B logger starts an offline run without wandb's deprecation warning about ``anonymous``."""

import os

import pytest

from lightning_ldm.training.loggers import wandb_logger


def test_an_offline_run_starts_without_the_anonymous_setting_warning(tmp_path, capfd, monkeypatch):
    for key in [k for k in os.environ if k.startswith("WANDB")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    logger = wandb_logger(save_dir=str(tmp_path), name="quiet", offline=True)
    try:
        logger.experiment.log({"x": 1.0})
    finally:
        import wandb
        wandb.finish()
    printed = capfd.readouterr()
    if "wandb" not in printed.out + printed.err:
        pytest.fail("wandb printed nothing at all: this test could not see its warnings")
    assert "anonymous" not in printed.out + printed.err
