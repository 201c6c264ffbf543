"""Training speed and memory in the logger: images per second over the last logging window (all ranks)
and the peak GPU memory, so runs of different configurations can be compared by cost, not only quality."""

import time

import lightning as L
import torch


class Throughput(L.Callback):
    def __init__(self, every_n_batches: int = 50) -> None:
        self.every_n_batches = every_n_batches
        self._start = None
        self._images = 0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._start is None:
            self._start, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
        self._images += first.shape[0] * trainer.world_size
        if (module.batch_step + 1) % self.every_n_batches:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # once per window, not per batch
        elapsed = time.perf_counter() - self._start
        metrics = {"perf/images_per_sec": self._images / max(elapsed, 1e-9)}
        if torch.cuda.is_available():
            metrics["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        self._start, self._images = time.perf_counter(), 0
