"""What every lightning_ldm LightningModule shares: its own batch counter, the stop at ``max_steps``, and a
guard that stops training on a non-finite loss with a checkpoint instead of training on garbage.

Why our own counter: with manual optimisation Lightning 2.x advances ``trainer.global_step`` on every
``optimizer.step()``, so a generator and a discriminator stepping on one batch count 2. ``disc_start``,
``max_steps``, EMA warm-up and log axes must count *batches*, so they use ``batch_step``.
"""

from pathlib import Path

import lightning as L
import torch

from lightning_ldm.errors import NonFiniteLossError


class StepCountingModule(L.LightningModule):
    def __init__(self, max_steps: int) -> None:
        super().__init__()
        self.max_steps = max_steps
        self.batch_step = 0  # training batches completed; saved in checkpoints

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.batch_step += 1
        if self.batch_step >= self.max_steps:
            self.trainer.should_stop = True

    def on_train_start(self) -> None:
        if self.batch_step >= self.max_steps:
            print(f"Training already reached max_steps={self.max_steps}; nothing to do.")
            self.trainer.should_stop = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["batch_step"] = self.batch_step

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.batch_step = int(checkpoint.get("batch_step", 0))

    def check_finite(self, loss: torch.Tensor, name: str) -> None:
        """Stop on NaN/inf before the bad gradient reaches the weights; keep the last good state on disk."""
        if torch.isfinite(loss).all():
            return
        path = None
        run_dir = getattr(self.trainer, "default_root_dir", None)
        if run_dir is not None:
            path = Path(run_dir) / "checkpoints" / f"nonfinite-step{self.batch_step}.ckpt"
            self.trainer.save_checkpoint(path)
        where = f"; state before this batch saved to {path}" if path else ""
        raise NonFiniteLossError(
            f"{name} loss is {loss.detach().float().cpu().item()} at batch {self.batch_step}{where}. "
            "Lower the learning rate, enable gradient clipping, or check the data"
        )

    def log_learning_rates(self, optimizers: dict) -> None:
        for name, opt in optimizers.items():
            self.log(f"train/lr_{name}", opt.param_groups[0]["lr"], on_step=True, on_epoch=False)
