"""No host reads of tensor values in the training hot path of either stage.

On a GPU, reading a tensor on the host (``.item()``, ``bool(t)``, ``float(t)``, ...) waits for every queued
kernel: the CPU can no longer queue the next step while the GPU runs this one, and the GPU idles while Python
catches up. The same call sites read on a CPU, so the test counts them here: every ``Tensor`` read during
steady-state batches, with the code that made it. Allowed: the data pipeline (host tensors, in loader workers
on a GPU machine) and the non-finite guard's verdict, which reads a pinned host copy two batches late
(training/nonfinite.py). Logging every ``log_every_n_steps`` batches and progress-bar redraws are switched off
here; they read by design, once per window.
"""

import traceback
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_ldm.autoencoder.export import save_autoencoder_export
from lightning_ldm.autoencoder.model import SMALL_PRESETS, Autoencoder
from lightning_ldm.data.digits import DigitsDataModule
from lightning_ldm.tasks import train as train_task

READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu")
FIRST_COUNTED, LAST_COUNTED = 3, 8  # batches: after the first steps (optimizer state, caches) are built
QUIET = ["trainer=cpu", "logger=none", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
         "trainer.log_every_n_steps=1000", "callbacks.progress=null", "+trainer.enable_progress_bar=false",
         "data.batch_size=4", f"max_steps={LAST_COUNTED + 2}"]


def _reader(frames: list[traceback.FrameSummary]) -> str:
    """The innermost frame of lightning_ldm or Lightning that asked for the value."""
    for frame in reversed(frames):
        if "lightning_ldm" in frame.filename or "/lightning/" in frame.filename:
            return f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno} {frame.name}"
    return "elsewhere"


def _allowed(reader: str) -> bool:
    return reader.startswith("data/") or reader.startswith("training/nonfinite.py")


@pytest.fixture
def count_reads(monkeypatch, with_callback):
    """Patches Tensor's reading methods; returns (counter list, Lightning callback that arms it per batch)."""
    armed = {"on": False}
    reads: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, _name=name, **kwargs):
            if armed["on"]:
                reads.append(f"{_name} from {_reader(traceback.extract_stack()[:-1])}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)

    class Arm(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            armed["on"] = FIRST_COUNTED <= batch_idx <= LAST_COUNTED

        def on_train_end(self, trainer, module):
            armed["on"] = False

    with_callback(Arm())
    return reads


def _fit(compose, tmp_path, *overrides):
    train_task.fit(compose(*QUIET, *overrides, f"paths.run_dir={tmp_path / 'run'}"))


def _forbidden(reads: list[str]) -> list[str]:
    assert reads, "nothing was counted: the counter is not armed"  # the guard's reads at least
    return [r for r in reads if not _allowed(r.split(" from ", 1)[1])]


# trainer=ddp on one CPU process: DDP's wrapper and reducer, GlobalBatchNorm and the strategy's own hooks are in
# the path (a read they caused on a GPU would be a sync per batch that single-device training does not have).
ONE_PROCESS_DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true"]
TRAINERS = pytest.mark.parametrize("trainer", [[], ONE_PROCESS_DDP], ids=["single device", "ddp"])


@TRAINERS
def test_stage1_with_discriminator_reads_nothing_per_batch(compose, tmp_path, count_reads, trainer):
    _fit(compose, tmp_path, "stage=autoencoder", "autoencoder=kl-f4-small", "loss.disc_start=0",
         "module.image_log_every=0", *trainer)
    assert _forbidden(count_reads) == []


@pytest.fixture(scope="module")
def kl_export(tmp_path_factory):
    torch.manual_seed(0)
    model = Autoencoder(in_channels=1, **SMALL_PRESETS["kl-f2-small"])
    path = tmp_path_factory.mktemp("export") / "autoencoder.safetensors"
    save_autoencoder_export(model, path, data=DigitsDataModule(batch_size=4).identity())
    return path


@TRAINERS
@pytest.mark.parametrize("latents", ["cached", "encoded every batch"])
def test_stage2_reads_nothing_per_batch(compose, tmp_path, count_reads, kl_export, latents, trainer):
    # The scale factor used to be checked for NaN on the host at every batch: one GPU sync per step.
    _fit(compose, tmp_path, "stage=diffusion", "unet=tiny", f"autoencoder.path={kl_export}",
         f"module.cache_latents={latents == 'cached'}", "module.num_log_images=0",
         "module.scale_estimation_batches=1", "conditioning=class",
         "module.conditioning.class.num_classes=10", *trainer)
    assert _forbidden(count_reads) == []
