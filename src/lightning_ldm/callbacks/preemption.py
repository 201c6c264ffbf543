"""Stopping early without losing work: SIGTERM (pre-emption), SIGUSR1 and the first Ctrl-C (SIGINT) save
``checkpoints/last.ckpt`` at the end of the current batch and stop cleanly; rerunning the same command resumes
from it. A second Ctrl-C aborts at once. The task then exits with the signal's status (``RunInterrupted``).

Lightning notices SIGTERM itself (``trainer.received_sigterm``, broadcast to every rank) but saves nothing;
Ctrl-C it turns into an abort without a checkpoint. SIGINT is therefore routed into the same flag as SIGTERM, so
every rank of a multi-GPU run stops at the same batch. SIGUSR1 is left to Lightning's SLURM handler when SLURM
auto-requeue is active (it saves and requeues).
"""

import signal
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException


class Preemption(L.Callback):
    def __init__(self, checkpoint_name: str = "checkpoints/last.ckpt") -> None:
        self.checkpoint_name = checkpoint_name
        self.requested = False
        self.saved_to = None
        self.stopped_by: Optional[int] = None  # the signal that stopped training, once it has
        self._trainer: Optional[L.Trainer] = None
        self._previous_sigint = None
        self._save_at_end = False

    def _on_sigusr1(self, signum, frame) -> None:
        self.requested, self.stopped_by = True, signum

    def _on_sigint(self, signum, frame) -> None:
        if self.stopped_by == signal.SIGINT:  # the second Ctrl-C
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.stopped_by = signal.SIGINT
        self._trainer._signal_connector.received_sigterm = True  # Lightning's stop path, on every rank
        rank_zero_only(print)("\nCtrl-C: saving a checkpoint at the end of this batch (Ctrl-C again aborts at once)",
                              flush=True)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._trainer = trainer
        environment = getattr(trainer.strategy, "cluster_environment", None)
        slurm_requeue = type(environment).__name__ == "SLURMEnvironment" and getattr(environment, "auto_requeue", False)
        if hasattr(signal, "SIGUSR1") and not slurm_requeue:
            signal.signal(signal.SIGUSR1, self._on_sigusr1)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where a host program set its own
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        # On several ranks Lightning also stops on the flag at the start of a batch, before any hook of ours runs;
        # the loop state there is the one after the last finished batch, so a checkpoint saved now resumes as well.
        if isinstance(exception, SIGTERMException):
            self._save_and_stop(trainer)
        self._restore_sigint()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self._save_and_stop(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # A signal after the epoch's last batch: Lightning would stop right after this hook, where a checkpoint
        # resumes into a repeated batch. Stop as at max_steps instead (the epoch completes) and save in
        # `on_train_end`. Rank 0 decides for all, as Lightning's own check does.
        stop = trainer.strategy.broadcast(bool(self.requested or trainer.received_sigterm), src=0)
        if stop and self.saved_to is None:
            self.stopped_by = self.stopped_by or signal.SIGTERM
            trainer._signal_connector.received_sigterm = False
            self.requested, self._save_at_end, trainer.should_stop = False, True, True

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._save_at_end:
            self._save_at_end, self.requested = False, True
            self._save_and_stop(trainer)
        self._restore_sigint()

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        # Any checkpoint taken once an epoch has completed (at max_steps or on a signal) still counts the epoch's
        # batches as the current ones, and Lightning resumes from it into one batch of a fresh iterator before it
        # starts the next epoch: a repeated batch and a shifted data order. Recording "next epoch, batch 0"
        # resumes exactly where an uninterrupted run goes on.
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        batches, epochs = loop.get("epoch_loop.batch_progress"), loop.get("epoch_progress")
        if batches and epochs and batches.get("is_last_batch") and \
                epochs["current"]["completed"] == epochs["current"]["started"]:
            batches["is_last_batch"] = False
            batches["current"] = {key: 0 for key in batches["current"]}

    def _save_and_stop(self, trainer: L.Trainer) -> None:
        if not (self.requested or trainer.received_sigterm) or self.saved_to is not None:
            return
        if self.stopped_by is None:
            self.stopped_by = signal.SIGTERM
        self.saved_to = Path(trainer.default_root_dir) / self.checkpoint_name
        trainer.save_checkpoint(self.saved_to, weights_only=False)
        rank_zero_only(print)(f"Stopped by {signal.Signals(self.stopped_by).name}: checkpoint saved to {self.saved_to}; "
                              "rerun the same command to resume.")
        trainer.should_stop = True  # SIGUSR1; for SIGTERM and SIGINT Lightning stops right after this hook
