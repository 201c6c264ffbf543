"""Pre-emption: SIGTERM (or SIGUSR1) saves ``checkpoints/last.ckpt`` at the end of the current batch and
stops cleanly; rerunning the same command resumes from it.

Lightning notices SIGTERM itself (``trainer.received_sigterm``, broadcast to every rank) but saves nothing.
SIGUSR1 is left to Lightning's SLURM handler when SLURM auto-requeue is active (it saves and requeues).
"""

import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class Preemption(L.Callback):
    def __init__(self, checkpoint_name: str = "checkpoints/last.ckpt") -> None:
        self.checkpoint_name = checkpoint_name
        self.requested = False
        self.saved_to = None

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        environment = getattr(trainer.strategy, "cluster_environment", None)
        slurm_requeue = type(environment).__name__ == "SLURMEnvironment" and getattr(environment, "auto_requeue", False)
        if hasattr(signal, "SIGUSR1") and not slurm_requeue:
            signal.signal(signal.SIGUSR1, self._on_signal)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not (self.requested or trainer.received_sigterm) or self.saved_to is not None:
            return
        self.saved_to = Path(trainer.default_root_dir) / self.checkpoint_name
        trainer.save_checkpoint(self.saved_to, weights_only=False)
        rank_zero_only(print)(f"Pre-empted: checkpoint saved to {self.saved_to}; rerun the same command to resume.")
        trainer.should_stop = True  # SIGUSR1; for SIGTERM Lightning stops right after this hook
