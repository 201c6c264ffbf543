"""No GPU sync per batch from logging: no metric logged during training asks Lightning to turn a tensor into a
number after every batch; the progress bar still shows the losses (read at its redraws)."""

import lightning as L
import pytest
from lightning.pytorch.trainer.connectors.logger_connector import result

from few_digits import FewDigits
from lightning_ldm.callbacks.progress import ProgressBar
from lightning_ldm.diffusion.module import DiffusionModule
from lightning_ldm.diffusion.schedules import NoiseSchedule
from lightning_ldm.latent.first_stage import load_first_stage
from test_autoencoder_module import TinyImages, make_module
from test_stage2 import TINY_UNET, make_export


@pytest.fixture
def conversions(monkeypatch) -> list[str]:
    """The hooks in which Lightning converted a logged tensor to a Python number (a device sync)."""
    calls: list[str] = []
    convert = result.convert_tensors_to_scalars

    def counting(value):
        calls.append("train" if counting.in_training_batch else "other")
        return convert(value)

    counting.in_training_batch = False
    monkeypatch.setattr(result, "convert_tensors_to_scalars", counting)
    return calls, counting


class Window(L.Callback):
    """Marks the span from a training batch's start to the next batch's start (Lightning converts at batch end)."""

    def __init__(self, flag) -> None:
        self.flag = flag

    def on_train_batch_start(self, *args) -> None:
        self.flag.in_training_batch = True

    def on_train_end(self, *args) -> None:
        self.flag.in_training_batch = False


def diffusion_module(tmp_path) -> tuple[DiffusionModule, FewDigits]:
    data = FewDigits(batch_size=4)
    export = make_export(tmp_path / "export/autoencoder.safetensors", data.identity())
    return DiffusionModule(first_stage=load_first_stage(path=str(export)), unet=TINY_UNET, schedule=NoiseSchedule(),
                           image_size=32, scale_estimation_batches=2, num_log_images=0, lr=1e-3, ema_decay=0.9, max_steps=4,
                           sampling={"steps": 2}), data


@pytest.mark.parametrize("stage", ["autoencoder", "diffusion"])
def test_training_batches_log_without_a_sync_and_the_bar_shows_the_loss(stage, tmp_path, conversions):
    calls, flag = conversions
    if stage == "autoencoder":
        module, data, key = make_module(max_steps=4, disc_start=2), TinyImages(), "train/rec_loss"
    else:
        (module, data), key = diffusion_module(tmp_path), "train/loss"
    bar = ProgressBar(refresh_rate=1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        log_every_n_steps=1, callbacks=[Window(flag), bar])
    trainer.fit(module, datamodule=data)
    assert module.batch_step == 4
    assert "train" not in calls  # nothing logged with prog_bar=True while training
    shown = bar.get_metrics(trainer, module)
    assert not any(k.startswith("train/") and k != key for k in shown), shown
    assert float(shown[key]) == pytest.approx(float(trainer.callback_metrics[key]), rel=1e-3)


def test_without_a_progress_bar_the_throughput_windows_are_printed(tmp_path, capsys):
    from lightning_ldm.callbacks.throughput import Throughput

    module, data = diffusion_module(tmp_path)
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
                        callbacks=[Throughput(every_n_batches=2)])
    trainer.fit(module, datamodule=data)
    lines = [line for line in capsys.readouterr().out.splitlines() if "images/s" in line]
    assert [line.split(":")[0] for line in lines] == ["batch 2", "batch 4"], lines
    assert all(float(line.split(": ")[1].split()[0]) > 0 for line in lines)
