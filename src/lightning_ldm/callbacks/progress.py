"""The progress bar: Lightning's TQDM bar, showing the training losses without a GPU sync every batch.

Lightning turns every metric logged with ``prog_bar=True`` into a Python number at the end of *every* batch
(``_ResultCollection.metrics`` -> ``convert_tensors_to_scalars``), whether or not a bar is drawn. That ``.item()``
waits for the GPU to finish the step, so the CPU can no longer queue the next step while the GPU runs this one:
for models whose steps take about as long to launch as to run (a 25.8M UNet on 8x8 latents) the step time
becomes launch time plus run time. So the modules log their losses without ``prog_bar``, and this bar reads the
latest ones from ``trainer.callback_metrics`` when it redraws (every ``refresh_rate`` batches).
"""

from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 10, shown: Sequence[str] = ("train/loss", "train/rec_loss")) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.shown = tuple(shown)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        for key in self.shown:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                items[key] = f"{float(value):.4g}"  # one sync per redraw
        return items
