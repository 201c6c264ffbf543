"""``task.run`` for both training stages: build everything from the config, fit, report where it went."""

from pathlib import Path
from typing import Optional

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_ldm.errors import CheckpointError
from lightning_ldm.tasks.run_dir import record_run
from lightning_ldm.training.checkpoint_io import AtomicCheckpointIO


def resume_checkpoint(resume: Optional[str], run_dir: Path) -> Optional[str]:
    """``resume=auto``: the run directory's last checkpoint if there is one; a path must exist."""
    if resume is None:
        return None
    if resume == "auto":
        # last.ckpt, or a newer SLURM requeue checkpoint (Lightning writes hpc_ckpt_<n>.ckpt on SIGUSR1).
        candidates = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        if not candidates:
            return None
        newest = max(candidates, key=lambda p: p.stat().st_mtime)
        if rank_zero_only.rank == 0:
            print(f"Resuming from {newest}")
        return str(newest)
    if not Path(resume).is_file():
        raise CheckpointError(f"resume={resume}: no such checkpoint file")
    return resume


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values() if node is not None]
    loggers = [instantiate(node) for node in (cfg.logger or {}).values() if node is not None]
    plugins = [instantiate(node) for node in cfg.trainer.get("plugins") or []]  # e.g. trainer=slurm's
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                       default_root_dir=str(run_dir), plugins=[*plugins, AtomicCheckpointIO()])


def fit(cfg: DictConfig) -> Optional[float]:
    run_dir = Path(cfg.paths.run_dir)
    if rank_zero_only.rank == 0:  # DDP re-runs this command in every rank: say things once
        record_run(cfg, run_dir)
        print(f"Run directory: {run_dir}")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_path = resume_checkpoint(cfg.resume, run_dir)
    if ckpt_path and cfg.task.name == "diffusion" and cfg.autoencoder.get("path", "") is None:
        # A resumed stage 2 keeps the first stage it was trained with (stored in its checkpoint), not
        # whatever export is newest now.
        cfg.autoencoder.path = ckpt_path
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module)
    trainer = build_trainer(cfg, run_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:  # the full resolved config beside every run's metrics
        logger.log_hyperparams(resolved)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        return None  # the Preemption callback saved last.ckpt; rerunning the command resumes
    if getattr(trainer, "received_sigterm", False):
        return None
    if trainer.is_global_zero:
        print(f"Done. Run directory: {run_dir}")
    monitored = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    return float(monitored) if monitored is not None else None
