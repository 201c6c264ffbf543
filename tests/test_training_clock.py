"""The training clock (validation excluded), the training-time budget's bad values, and the compile switch."""

import time
import types

import lightning as L
import torch

from conftest import assert_one_line_error, run_cli
from lightning_ldm.training.acceleration import resolve_compile
from test_autoencoder_module import TinyImages, make_module


def test_validation_time_is_not_training_time(tmp_path):
    module = make_module(max_steps=4, disc_start=100)
    original = module.validation_step

    def slow_validation(batch, batch_idx):
        time.sleep(0.5)
        return original(batch, batch_idx)

    module.validation_step = slow_validation
    start = time.perf_counter()
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=TinyImages())
    wall = time.perf_counter() - start
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # Two validations of >= 0.5 s each ran inside the fit; none of that is training time.
    assert 0 < checkpoint["training_seconds"] < wall - 1.0


def test_a_non_positive_time_budget_is_one_clear_error(tmp_path):
    result = run_cli("stage=autoencoder", "logger=none", "max_train_seconds=0", cwd=tmp_path)
    assert_one_line_error(result, "max_train_seconds must be positive")


def test_compile_is_on_for_gpus_by_default_and_forced_either_way():
    def trainer(device: str):
        return types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device(device)))

    assert resolve_compile(None, trainer("cuda")) and not resolve_compile(None, trainer("cpu"))
    assert resolve_compile(True, trainer("cpu")) and not resolve_compile(False, trainer("cuda"))


def test_a_stop_before_any_validation_leaves_one_last_checkpoint(tmp_path, compose):
    """The module saves last.ckpt when it stops; the configured ModelCheckpoint then saves its own last.ckpt at
    the end-of-fit validation: it must overwrite that file, not add a last-v1.ckpt beside it."""
    from hydra.utils import instantiate

    cfg = compose("stage=autoencoder")
    checkpoint = instantiate(cfg.callbacks.checkpoint, dirpath=str(tmp_path / "r" / "checkpoints"))
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, logger=False, callbacks=[checkpoint],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path / "r"),
                        limit_val_batches=1, val_check_interval=100, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0)
    trainer.fit(make_module(max_steps=3, disc_start=100), datamodule=TinyImages())
    saved = sorted(p.name for p in (tmp_path / "r" / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in saved and not [name for name in saved if "-v" in name], saved


def test_the_agreed_clock_is_read_once_per_batch_whoever_asks(tmp_path):
    """The time-based FID schedule and max_train_seconds both ask at every TIME_CHECK_EVERY-th batch: one read
    (a GPU sync, and a collective under DDP) serves both."""

    started = [0]

    class AskingToo(L.Callback):  # stands in for the FID callback's time check, which runs before the module's
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            started[0] += 1

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if (module.batch_step + 1) % module.TIME_CHECK_EVERY == 0:
                module.agreed_training_seconds()

    module = make_module(max_steps=6, disc_start=100)
    module.max_train_seconds = 1e9
    module.TIME_CHECK_EVERY = 2
    reads = []  # the batch (counted from 1) of every clock read
    clock = module.training_seconds
    module.training_seconds = lambda: reads.append(started[0]) or clock()
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        limit_val_batches=0, callbacks=[AskingToo()])
    trainer.fit(module, datamodule=TinyImages())
    during = [batch for batch in reads if 0 < batch < 6]  # the last batch also reads for the final checkpoint
    assert during == [2, 4], reads
