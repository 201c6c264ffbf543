"""What makes runs comparable on the W&B project page without configuring panels: every chart on the
per-batch step axis, and run summaries that keep the best value of each validation metric (lowest loss,
FID and LPIPS; highest PSNR and SSIM) instead of the last one."""

import lightning as L
from lightning.pytorch.loggers import WandbLogger

LOWER_IS_BETTER = ("val/loss", "val/rec_loss", "val/lpips", "val/fid*", "val/fd-*", "val/rfid*", "val/kid*")
HIGHER_IS_BETTER = ("val/psnr", "val/ssim", "val/is*", "val/precision*", "val/recall*")


class WandbDashboard(L.Callback):
    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger) or not trainer.is_global_zero:
                continue
            run = logger.experiment
            run.define_metric("trainer/global_step")  # Lightning's step value = batches seen (see README)
            run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
            for pattern in LOWER_IS_BETTER:
                run.define_metric(pattern, step_metric="trainer/global_step", summary="min,last")
            for pattern in HIGHER_IS_BETTER:
                run.define_metric(pattern, step_metric="trainer/global_step", summary="max,last")
