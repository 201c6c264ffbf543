"""Runs that never lie: a resume applies or refuses each changed value and rewrites nothing when it fails, one
process per run directory, unfinished results are marked as such, kept files are written atomically, and the
last bad inputs stop in one line. (Signals and the CSV history across a resume: test_resume.py; a truncated
sample and a diverged checkpoint at sampling: test_cli_diffusion.py.)"""

import csv
import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from lightning_ldm.atomic import atomic_path, write_text
from lightning_ldm.autoencoder.export import read_export_metadata, save_autoencoder_export
from lightning_ldm.autoencoder.model import SMALL_PRESETS, Autoencoder
from lightning_ldm.config.validate import validate_config
from lightning_ldm.data.digits import DigitsDataModule
from lightning_ldm.errors import CheckpointError, ConfigError
from lightning_ldm.latent.first_stage import first_stage_from_checkpoint, newest_matching_export
from lightning_ldm.tasks.resume import plan_resume
from lightning_ldm.tasks.run_lock import RunInUseError, RunLock
from lightning_ldm.tasks.train import build_trainer, fit
from lightning_ldm.training.checkpoint_io import AtomicCheckpointIO

STAGE1 = ["stage=autoencoder", "trainer=cpu", "logger=csv", "data.batch_size=4", "trainer.limit_val_batches=1",
          "trainer.val_check_interval=2", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
          "module.image_log_every=0", "autoencoder=kl-f2-small", "callbacks.progress.refresh_rate=0"]


def _stage1(compose, tmp_path, steps, *overrides):
    cfg = compose(*STAGE1, f"max_steps={steps}", "run_name=r", f"paths.run_dir={tmp_path / 'r'}", *overrides)
    fit(cfg)
    return tmp_path / "r"


# ----------------------------------------------------------------------------------------- resume (2, 3)
def test_a_changed_lr_is_applied_to_the_optimizers_and_recorded_with_its_batch(compose, tmp_path):
    run = _stage1(compose, tmp_path, 4)
    _stage1(compose, tmp_path, 6, "module.lr=1e-5")
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["batch_step"] == 6
    for state in checkpoint["optimizer_states"]:  # the generator's and the discriminator's Adam
        assert [group["lr"] for group in state["param_groups"]] == [1e-5]
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    lrs = {int(r["step"]): float(r["train/lr_g"]) for r in rows if r.get("train/lr_g")}
    assert lrs == pytest.approx({0: 1e-3, 1: 1e-3, 2: 1e-3, 3: 1e-3, 4: 1e-5, 5: 1e-5}, rel=1e-6)
    resume = json.loads((run / "run_info.json").read_text())["history"][2]
    assert resume["event"] == "resume" and resume["at_batch"] == 4
    assert resume["changes"]["module.lr"] == [1e-3, 1e-5]
    assert "lr: 1.0e-05" in (run / "config.yaml").read_text()


def test_the_lr_change_keeps_the_warmup_schedule_position(compose, tmp_path, monkeypatch):
    """Stage 2's LambdaLR warm-up: the resumed rate is the new base times the schedule's factor at that batch."""
    from lightning_ldm.training.optimizer_settings import apply_configured_learning_rates

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-4)

    class Module:
        def configure_optimizers(self):
            fresh = torch.optim.AdamW(model.parameters(), lr=1e-4)
            return {"optimizer": fresh, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 1.0)}

    module = Module()
    module.trainer = type("T", (), {"optimizers": [optimizer],
                                    "lr_scheduler_configs": [type("C", (), {"scheduler": scheduler})]})()
    assert apply_configured_learning_rates(module) == ["lr 0.001 -> 0.0001 (optimizer 0)"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-5) and scheduler.base_lrs == [1e-4]
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-5)  # 1e-4 * (4 + 1) / 10


def test_a_failed_resume_rewrites_nothing_and_names_what_changed(compose, tmp_path):
    run = _stage1(compose, tmp_path, 2)
    records = {name: (run / name).read_bytes() for name in ("config.yaml", "run_info.json")}
    checkpoint = (run / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ConfigError, match=r"autoencoder\.ch_mult \[1, 1\] -> \[1, 2, 2\].*cannot change"):
        _stage1(compose, tmp_path, 4, "autoencoder=kl-f4-small")
    with pytest.raises(ConfigError, match=r"seed 0 -> 1"):
        _stage1(compose, tmp_path, 4, "seed=1")
    assert {name: (run / name).read_bytes() for name in records} == records
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == checkpoint
    assert not (run / ".lock").exists()  # released on the way out


def test_stage2_resume_refuses_a_new_prediction_target(tmp_path):
    checkpoint = tmp_path / "last.ckpt"
    config = {"task": {"name": "diffusion"}, "module": {"prediction": "eps", "lr": 1e-3}, "max_steps": 10}
    torch.save({"run_config": config, "batch_step": 10}, checkpoint)
    with pytest.raises(ConfigError, match=r"module\.prediction 'eps' -> 'v'"):
        plan_resume(str(checkpoint), {**config, "module": {"prediction": "v", "lr": 1e-3}})
    plan = plan_resume(str(checkpoint), {**config, "max_steps": 20, "module": {"prediction": "eps", "lr": 1e-4}})
    assert plan.at_batch == 10 and plan.changes == {"max_steps": [10, 20], "module.lr": [1e-3, 1e-4]}
    with pytest.raises(ConfigError, match=r"checkpoint of stage=diffusion, and this is stage=autoencoder"):
        plan_resume(str(checkpoint), {"task": {"name": "autoencoder"}})


# ----------------------------------------------------------------------------------------- the run lock (4)
_HOLDER = """
import sys, time
from lightning_ldm.tasks.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_process_on_the_same_run_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUseError, match=rf"in use by pid {holder.pid} on \S+ \(since "):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock file stays behind
        holder.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid
    with RunLock(tmp_path):
        assert f"taking over {tmp_path / '.lock'} from pid {holder.pid}" in capsys.readouterr().out
        with pytest.raises(RunInUseError):  # a second lock, even in the same process
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()


# ----------------------------------------------------------------------------------------- unfinished results (5)
def _export(path: Path, complete: bool, batch: int) -> Path:
    torch.manual_seed(0)
    model = Autoencoder(in_channels=1, **SMALL_PRESETS["kl-f2-small"])
    info = {"batch_step": batch, "max_steps": 10, "complete": complete}
    return save_autoencoder_export(model, path, data=DigitsDataModule(batch_size=4).identity(), info=info)


def test_stage2_takes_only_finished_exports_unless_told_otherwise(tmp_path):
    identity = DigitsDataModule(batch_size=4).identity()
    unfinished = _export(tmp_path / "b" / "export" / "autoencoder.safetensors", False, 3)
    with pytest.raises(CheckpointError, match=r"did not finish \(newest: .*b/export.*batch 3 of 10\).*allow_incomplete"):
        newest_matching_export(tmp_path, identity)
    assert newest_matching_export(tmp_path, identity, allow_incomplete=True) == unfinished
    time.sleep(0.01)
    finished = _export(tmp_path / "a" / "export" / "autoencoder.safetensors", True, 10)
    unfinished.touch()  # the newer file, yet unfinished
    assert newest_matching_export(tmp_path, identity) == finished


def test_a_run_that_reaches_max_steps_exports_complete_and_a_validation_export_does_not(compose, tmp_path):
    from lightning_ldm.callbacks.export import AutoencoderExport

    run = _stage1(compose, tmp_path, 3)
    info = read_export_metadata(run / "export" / "autoencoder.safetensors")["info"]
    assert info["complete"] is True and info["batch_step"] == 3 and info["max_steps"] == 3
    module = instantiate(compose(*STAGE1, "max_steps=9").module)
    module.batch_step = 4  # an export written at a validation before the end
    trainer = type("T", (), {"datamodule": None, "callback_metrics": {}, "default_root_dir": str(tmp_path)})()
    AutoencoderExport().write(trainer, module, tmp_path / "mid.safetensors")
    assert read_export_metadata(tmp_path / "mid.safetensors")["info"]["complete"] is False


# ----------------------------------------------------------------------------------------- atomic files (5)
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_text(tmp_path / "report.json", "old")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_checkpoint_that_cannot_be_written_leaves_no_temporary(tmp_path):
    with pytest.raises(Exception):
        AtomicCheckpointIO().save_checkpoint({"state": lambda: None}, tmp_path / "best.ckpt")  # unpicklable
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------- one line each (7)
@pytest.mark.parametrize("stage, override, message", [
    ("autoencoder", "max_steps=0", "max_steps: must be at least 1, got 0"),
    ("sample", "sample.batch_size=0", "sample.batch_size: must be at least 1, got 0"),
    ("sample", "sample.num_samples=0", "sample.num_samples: must be at least 1, got 0"),
    ("sample", "sample.num_samples=-5", "sample.num_samples: must be at least 1, got -5"),
    ("sample", "sample.steps=0", "sample.steps: must be at least 1, got 0"),
    ("evaluate", "evaluate.steps=0", "evaluate.steps: must be at least 1, got 0"),
])
def test_counts_below_their_minimum_are_refused(compose, stage, override, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose(f"stage={stage}", override))


def test_a_negative_learning_rate_is_refused(compose):
    with pytest.raises(Exception) as raised:  # Hydra wraps what a constructor raises; the entry point unwraps it
        instantiate(compose("module.lr=-1").module)
    assert isinstance(raised.value.__cause__, ConfigError)
    assert str(raised.value.__cause__) == "module.lr must be positive, got -1"


def test_disabling_the_progress_bar_drops_ours_and_a_logger_without_target_is_named(compose, tmp_path):
    trainer = build_trainer(compose(*STAGE1, "+trainer.enable_progress_bar=false"), tmp_path)
    assert trainer.progress_bar_callback is None
    with pytest.raises(ConfigError, match=r"logger\.csv: has no _target_.*logger=<name>"):
        build_trainer(compose("logger=none", "+logger.csv.save_dir=x"), tmp_path)


def test_a_stage1_checkpoint_given_as_the_first_stage_points_to_the_export(tmp_path):
    run = tmp_path / "ae"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {"autoencoder.x": torch.zeros(1)}}, run / "checkpoints" / "last.ckpt")
    export = _export(run / "export" / "autoencoder.safetensors", True, 10)
    with pytest.raises(CheckpointError, match=rf"holds no lightning_ldm stage-2 first stage.*autoencoder.path={export}"):
        first_stage_from_checkpoint(run / "checkpoints" / "last.ckpt", True)


def test_images_smaller_than_image_size_are_upscaled_with_a_warning_when_verified(tmp_path, capsys):
    from PIL import Image

    from lightning_ldm.data.folder import ImageFolderDataModule

    for index, size in enumerate((8, 32, 40, 1)):
        Image.new("RGB", (size, size), (index * 50, 0, 0)).save(tmp_path / f"{index}.png")
    data = ImageFolderDataModule(root=str(tmp_path), image_size=32, batch_size=2, num_workers=0, verify=True)
    data.setup("fit")
    assert "warning: 2 of 4 images are smaller than data.image_size=32 and are upscaled" in capsys.readouterr().out


def test_tensorboard_drops_the_points_a_resume_makes_again(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_ldm.training.loggers import tensorboard_logger

    first = tensorboard_logger(save_dir=str(tmp_path))
    for step in range(6):  # the checkpoint was at batch 3; batches 3-5 are lost with the interruption
        first.log_metrics({"x": float(step)}, step=step)
    first.finalize("success")
    time.sleep(1.1)  # event file names carry the second they were created in
    resumed = tensorboard_logger(save_dir=str(tmp_path))
    resumed.resume_at(3)
    for step in (3, 4):
        resumed.log_metrics({"x": 10.0 + step}, step=step)
    resumed.finalize("success")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("x")] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
