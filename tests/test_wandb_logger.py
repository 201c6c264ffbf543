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


def test_evaluation_metrics_and_exports_go_into_the_w_and_b_run_that_trained_the_checkpoint(tmp_path, monkeypatch):
    from lightning_ldm.training.loggers import log_to_training_run, training_run_of
    from wandb_offline import read_history

    for key in [k for k in os.environ if k.startswith("WANDB")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    run = tmp_path / "outputs/diffusion/ldm"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints/last.ckpt").write_bytes(b"x")
    (run / "export").mkdir()
    (run / "export/model.txt").write_text("weights")
    assert training_run_of(run / "checkpoints/last.ckpt") == run.resolve()
    assert training_run_of(tmp_path / "loose.ckpt") is None
    assert log_to_training_run(run, metrics={"fid@100": 12.5}) is None  # this run logged no W&B run: nothing to add
    (run / "wandb").mkdir()
    (run / "wandb/run_id").write_text("abcd1234")
    assert log_to_training_run(run, metrics={"fid@100": 12.5, "note": "text"}, artifact=run / "export") == "abcd1234"
    folders = list((run / "wandb").glob("offline-run-*-abcd1234"))
    assert folders, "the metrics went to a run of another id"
    assert {"eval/fid@100": 12.5} == {k: v for k, v in read_history(run)[-1].items() if k.startswith("eval/")}
    # a W&B logger started later in the same process still goes offline by itself
    logger = wandb_logger(save_dir=str(tmp_path / "later"), name="later", offline=True)
    try:
        logger.experiment.log({"x": 1.0})
    finally:
        import wandb
        wandb.finish()
    assert list((tmp_path / "later/wandb").glob("offline-run-*"))
