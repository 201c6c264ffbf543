"""Exact resume and pre-emption: N + N steps across an interruption equal 2N steps without one."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_ldm.autoencoder.export import save_autoencoder_export
from lightning_ldm.autoencoder.model import SMALL_PRESETS, Autoencoder
from lightning_ldm.data.digits import DigitsDataModule
from lightning_ldm.tasks.train import fit

STAGE2 = ["stage=diffusion", "trainer=cpu", "logger=csv", "data.batch_size=4", "trainer.log_every_n_steps=1",
          "trainer.limit_val_batches=1", "trainer.val_check_interval=3", "trainer.num_sanity_val_steps=0",
          "module.scale_estimation_batches=1", "module.num_log_images=0", "module.warmup_steps=2",
          "module.ema_decay=0.9", "callbacks.progress.refresh_rate=0"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    model = Autoencoder(in_channels=1, **SMALL_PRESETS["kl-f2-small"])
    path = tmp_path_factory.mktemp("export") / "autoencoder.safetensors"
    save_autoencoder_export(model, path, data=DigitsDataModule(batch_size=4).identity())
    return path


def _losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader(open(run_dir / "csv" / "metrics.csv"))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def _ema(run_dir: Path) -> dict:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("ema.")}


def _run(compose, tmp_path, export, name, steps, *overrides):
    cfg = compose(*STAGE2, f"max_steps={steps}", f"run_name={name}", f"autoencoder.path={export}",
                  f"paths.run_dir={tmp_path / name}", *overrides)
    fit(cfg)
    return tmp_path / name


def _matches_uninterrupted(run) -> dict:
    """``run(name, steps)`` trains a run directory: 5 steps, then resumed to 8, against 8 in one go. The losses of
    every step and the EMA weights must agree; returns the EMA state."""
    full = run("full", 8)
    half = run("half", 5)  # stops mid-epoch, between validations
    assert (half / "checkpoints" / "last.ckpt").is_file()
    resumed = _losses(half)
    run("half", 8)  # same run directory: resume=auto continues it
    resumed.update(_losses(half))
    expected = _losses(full)
    assert sorted(expected) == sorted(resumed) == list(range(8))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), step
    ema_full, ema_resumed = _ema(full), _ema(half)
    assert ema_full.keys() == ema_resumed.keys()
    for key in ema_full:
        if isinstance(ema_full[key], torch.Tensor):  # not the tokenizer's extra state
            torch.testing.assert_close(ema_resumed[key], ema_full[key], rtol=1e-5, atol=1e-7)
    return ema_full


# Both targets: with one of them (which, depended on the run) the loggers' step came back one batch late.
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_interrupted_and_resumed_run_matches_the_uninterrupted_one(compose, tmp_path, export, prediction):
    _matches_uninterrupted(lambda name, steps: _run(compose, tmp_path, export, name, steps,
                                                    f"module.prediction={prediction}"))


TEXT = ["data=captioned_digits", "data.num_scenes=48", "data.image_size=32", "autoencoder=identity", "unet=tiny",
        "conditioning=text", "module.conditioning.caption.dim=32", "module.conditioning.caption.depth=1",
        "module.conditioning.caption.heads=2", "module.conditioning.caption.dim_head=16",
        "module.conditioning.caption.length=12", "module.conditioning.caption.drop_rate=0.3"]


def test_a_resumed_text_to_image_run_matches_the_uninterrupted_one(compose, tmp_path):
    """The jointly trained text encoder, its optimizer state, its EMA and the tokenizer all come back: the same
    losses and the same averaged encoder as a run that was never stopped (captions cached as token ids)."""
    def run(name, steps):
        cfg = compose(*STAGE2, *TEXT, f"max_steps={steps}", f"run_name={name}", f"paths.run_dir={tmp_path / name}")
        fit(cfg)
        return tmp_path / name

    ema = _matches_uninterrupted(run)
    assert any(key.startswith("ema.model.conditioner.embedders.caption.encoder") for key in ema)


@pytest.mark.parametrize("task", ["conditioning=super_resolution module.conditioning.low_res.factor=2 "
                                  "module.conditioning.low_res.noise_std=[0.0,0.1]", "conditioning=inpainting"])
def test_a_resumed_image_conditioned_run_matches_the_uninterrupted_one(compose, tmp_path, export, task):
    """Pairs drawn afresh every step (degradations, masks) come back as the uninterrupted run drew them."""
    _matches_uninterrupted(lambda name, steps: _run(compose, tmp_path, export, name, steps, "data.image_size=28",
                                                    *task.split()))


def _steps(metrics: Path) -> list[int]:
    return [int(row["step"]) for row in csv.DictReader(open(metrics)) if row.get("train/loss")]


# SIGTERM (pre-emption) and the first Ctrl-C both save a checkpoint at the end of the batch; the exit status says
# the run did not finish. Rerunning resumes, and metrics.csv keeps its history: each batch logged once, in order.
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_keeps_the_logged_history(tmp_path, export, signum):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "lightning_ldm", *STAGE2, "run_name=pre", f"autoencoder.path={export}",
               "trainer.val_check_interval=1000"]
    process = subprocess.Popen([*command, "max_steps=100000"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "outputs" / "diffusion" / "pre"
    metrics = run_dir / "csv" / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") > 3):
        time.sleep(0.5)  # wait until training is under way (the CSV logger flushes every few steps)
        if process.poll() is not None:
            break
    # A second command on the same run while the first trains: refused, naming the first.
    second = subprocess.run([*command, "max_steps=100000"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 2 and f"is in use by pid {process.pid}" in second.stderr, second.stderr[-2000:]
    process.send_signal(signum)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, output[-3000:]
    assert f"Stopped by {signum.name}: checkpoint saved to" in output and "Traceback" not in output, output[-3000:]
    assert "Not finished" in output
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    stopped_at = checkpoint["batch_step"]
    assert stopped_at > 0 and "rng_states" in checkpoint and checkpoint["run_config"]["task"]["name"] == "diffusion"
    assert _steps(metrics) == list(range(stopped_at))

    resumed = subprocess.run([*command, f"max_steps={stopped_at + 3}"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _steps(metrics) == list(range(stopped_at + 3))
    history = json.loads((run_dir / "run_info.json").read_text())["history"]
    assert [(e["event"], e.get("at_batch"), e.get("status")) for e in history] == [
        ("start", None, None), ("end", stopped_at, f"stopped by {signum.name}"),
        ("resume", stopped_at, None), ("end", stopped_at + 3, "finished")]
    assert history[2]["changes"]["max_steps"] == [100000, stopped_at + 3]


def test_a_run_started_from_other_weights_resumes_from_its_own_checkpoint_without_them(compose, tmp_path, export):
    import shutil

    source = _run(compose, tmp_path, export, "source", 2) / "export" / "ldm-ema.safetensors"
    init = tmp_path / "init.safetensors"
    shutil.copy(source, init)

    def run(name, steps):
        if name == "half" and (tmp_path / "half").exists():
            init.unlink()  # a resume restores the run's checkpoint: its starting weights may be gone by then
        return _run(compose, tmp_path, export, name, steps, f"module.init_from={init}")

    _matches_uninterrupted(run)
    plain = _run(compose, tmp_path, export, "plain", 1)
    assert _losses(plain)[0] != pytest.approx(_losses(tmp_path / "full")[0])  # the init took effect in training
