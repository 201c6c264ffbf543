"""The Preemption callback saves wherever Lightning stops on a signal, not only after a batch: a SIGTERM that lands
between the last batch of an epoch and the epoch's end, or after `on_train_epoch_end`, must still leave a
checkpoint from which the run resumes to the same batches as an uninterrupted one."""

import signal

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldm.callbacks.preemption import Preemption


class Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(float(batch[0].sum()))
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.arange(8.0).view(8, 1)), batch_size=2)  # 4 batches per epoch


class SignalAt(L.Callback):
    """Raises Lightning's SIGTERM flag in the named hook of the first epoch, as a signal arriving then would."""

    def __init__(self, hook: str) -> None:
        self.hook = hook

    def _raise(self, trainer) -> None:
        if trainer.current_epoch == 0:
            trainer._signal_connector.received_sigterm = True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.hook == "last_batch_end" and batch_idx == 3:
            self._raise(trainer)

    def on_train_epoch_end(self, trainer, module):
        if self.hook == "epoch_end":
            self._raise(trainer)


def _trainer(tmp_path, *callbacks) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, max_steps=10, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))


@pytest.mark.parametrize("hook, signal_first", [("last_batch_end", True), ("last_batch_end", False),
                                                ("epoch_end", False)])
def test_a_signal_at_the_end_of_an_epoch_saves_and_resumes_exactly(tmp_path, hook, signal_first):
    uninterrupted = Recorder()
    _trainer(tmp_path / "full").fit(uninterrupted)

    # A signaller after Preemption's hook of the same name: the save has to come from a later point.
    preemption, interrupted = Preemption(), Recorder()
    callbacks = [SignalAt(hook), preemption] if signal_first else [preemption, SignalAt(hook)]
    try:
        _trainer(tmp_path / "cut", *callbacks).fit(interrupted)
    except SystemExit:
        pass
    assert preemption.stopped_by == signal.SIGTERM and preemption.saved_to.is_file()
    assert len(interrupted.seen) == 4

    resumed = Recorder()
    _trainer(tmp_path / "cut", Preemption()).fit(resumed, ckpt_path=preemption.saved_to)
    assert interrupted.seen + resumed.seen == uninterrupted.seen


def test_a_run_extended_past_a_max_steps_at_an_epoch_end_goes_on_without_repeating_a_batch(tmp_path):
    uninterrupted = Recorder()
    _trainer(tmp_path / "full").fit(uninterrupted)
    first, trainer = Recorder(), L.Trainer(default_root_dir=tmp_path, max_steps=4, logger=False,
                                           enable_checkpointing=False, enable_progress_bar=False,
                                           enable_model_summary=False, callbacks=[Preemption()])
    trainer.fit(first)
    trainer.save_checkpoint(tmp_path / "at_4.ckpt")
    extended = Recorder()
    _trainer(tmp_path, Preemption()).fit(extended, ckpt_path=tmp_path / "at_4.ckpt")
    assert first.seen + extended.seen == uninterrupted.seen
