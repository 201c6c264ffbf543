"""The run's config travels in every checkpoint (what a resume is checked against), and the run directory's
records (``tasks/run_dir.py``) are written once training has started: for a resume, that is after Lightning
restored the checkpoint, so a command that cannot resume rewrites nothing."""

from pathlib import Path
from typing import Optional

import lightning as L
from omegaconf import DictConfig

from lightning_ldm.tasks.resume import ResumePlan
from lightning_ldm.tasks.run_dir import record_event


class RunRecord(L.Callback):
    def __init__(self, cfg: DictConfig, resolved: dict, resume: Optional[ResumePlan]) -> None:
        self.cfg = cfg
        self.resolved = resolved
        self.resume = resume

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["run_config"] = self.resolved

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.resume is None:
            return
        run_dir = Path(trainer.default_root_dir)
        record_event(run_dir, "resume", self.cfg, at_batch=module.batch_step, checkpoint=self.resume.checkpoint,
                     changes=self.resume.changes)
        for key, (old, new) in self.resume.changes.items():
            print(f"Resumed at batch {module.batch_step}: {key} {old} -> {new}")
