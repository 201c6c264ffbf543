"""Training speed and memory in the logger: images per second over the last logging window (all ranks), the
training time so far (validation and FID excluded: the x axis for quality against compute) and the peak GPU
memory, so runs of different configurations can be compared by cost, not only quality. Without a progress bar
(batch jobs: SLURM logs, ``trainer.enable_progress_bar=false``) each window is also printed as one line, so a log
shows that the run is alive and how fast it goes."""

import lightning as L
import torch


class Throughput(L.Callback):
    def __init__(self, every_n_batches: int = 50) -> None:
        self.every_n_batches = every_n_batches
        self._window_start = None
        self._images = 0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._window_start, self._images = module.training_seconds(), 0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
        self._images += first.shape[0] * trainer.world_size
        if (module.batch_step + 1) % self.every_n_batches:
            return
        now = module.training_seconds()  # one GPU sync per window, not per batch
        metrics = {"perf/images_per_sec": self._images / max(now - self._window_start, 1e-9),
                   "perf/train_seconds": now}
        if torch.cuda.is_available():
            metrics["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        if trainer.progress_bar_callback is None and trainer.is_global_zero:
            memory = f", peak {metrics['perf/peak_memory_gb']:.1f} GiB" if "perf/peak_memory_gb" in metrics else ""
            print(f"batch {module.batch_step + 1}: {metrics['perf/images_per_sec']:.1f} images/s, "
                  f"{now:.1f} s of training{memory}", flush=True)
        self._window_start, self._images = now, 0
