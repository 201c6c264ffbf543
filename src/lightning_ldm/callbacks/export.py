"""Keep the run's inference-only exports current: after every validation and at the end of fit.

Stage 1 writes ``export/autoencoder.safetensors`` (what stage 2 loads); stage 2 writes the slim EMA-only
``export/ldm-ema.safetensors`` (what sampling and evaluation need, without optimiser state).
"""

from pathlib import Path

import lightning as L


class _ExportCallback(L.Callback):
    filename = ""

    def path(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.filename

    def write(self, trainer: L.Trainer, module: L.LightningModule, path: Path) -> None:
        raise NotImplementedError

    def _export(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.write(trainer, module, self.path(trainer))

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._export(trainer, module)

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._export(trainer, module)
        if trainer.is_global_zero:
            print(f"Export: {self.path(trainer)}")


class AutoencoderExport(_ExportCallback):
    filename = "export/autoencoder.safetensors"

    def write(self, trainer: L.Trainer, module: L.LightningModule, path: Path) -> None:
        from lightning_ldm.autoencoder.export import save_autoencoder_export

        datamodule = getattr(trainer, "datamodule", None)
        data = datamodule.identity() if datamodule is not None and hasattr(datamodule, "identity") else {}
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        # complete: the run reached its end (max_steps or max_train_seconds); exports written at validations and by a
        # pre-empted run are not, and stage 2's search for an export passes them over.
        info = {"batch_step": module.batch_step, "max_steps": module.max_steps, "complete": bool(module.reached_end),
                "metrics": metrics, "run_dir": str(trainer.default_root_dir)}
        save_autoencoder_export(module.autoencoder, path, data=data, info=info)


class DiffusionExport(_ExportCallback):
    filename = "export/ldm-ema.safetensors"

    def write(self, trainer: L.Trainer, module: L.LightningModule, path: Path) -> None:
        from lightning_ldm.diffusion.checkpoint import save_ema_export

        save_ema_export(module, path)
