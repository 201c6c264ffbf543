"""``task.run`` for both training stages: build everything from the config, fit, report where it went."""

import signal
from pathlib import Path
from typing import Optional

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lightning_ldm.callbacks.run_record import RunRecord
from lightning_ldm.errors import ConfigError, RunInterrupted
from lightning_ldm.tasks.resume import ResumePlan, plan_resume, resume_checkpoint
from lightning_ldm.tasks.run_dir import record_event
from lightning_ldm.tasks.run_lock import holds_run_lock
from lightning_ldm.training.checkpoint_io import AtomicCheckpointIO


def _instantiate_group(cfg: DictConfig, group: str) -> list:
    objects = []
    for name, node in (cfg.get(group) or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ConfigError(f"{group}.{name}: has no _target_, so it is not a {group[:-1] if group.endswith('s') else group} "
                              f"(select one with {group}=<name>, or add {group}.{name}._target_=...)")
        objects.append(instantiate(node))
    return objects


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: tuple = ()) -> L.Trainer:
    callbacks = _instantiate_group(cfg, "callbacks")
    if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses a progress bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = _instantiate_group(cfg, "logger")
    plugins = [instantiate(node) for node in cfg.trainer.get("plugins") or []]  # e.g. trainer=slurm's
    return instantiate(cfg.trainer, callbacks=[*callbacks, *extra_callbacks], logger=loggers or False,
                       default_root_dir=str(run_dir), plugins=[*plugins, AtomicCheckpointIO()])


@holds_run_lock
def fit(cfg: DictConfig) -> Optional[float]:
    run_dir = Path(cfg.paths.run_dir)
    rank_zero = rank_zero_only.rank == 0  # DDP re-runs this command in every rank: say and record things once
    resolved = OmegaConf.to_container(cfg, resolve=True)
    ckpt_path = resume_checkpoint(cfg.resume, run_dir)
    resume: Optional[ResumePlan] = plan_resume(ckpt_path, resolved) if ckpt_path else None
    if rank_zero:
        if resume is None:
            record_event(run_dir, "start", cfg)
        print(f"Run directory: {run_dir}")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if ckpt_path and cfg.task.name == "diffusion" and cfg.autoencoder.get("path", "") is None:
        # A resumed stage 2 keeps the first stage it was trained with (stored in its checkpoint), not
        # whatever export is newest now.
        cfg.autoencoder.path = ckpt_path
    if ckpt_path and cfg.module.get("init_from"):
        cfg.module.init_from = None  # the checkpoint holds the run's own weights; its starting point may be gone
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module)
    if hasattr(module, "wrap_data"):
        datamodule = module.wrap_data(datamodule)
    trainer = build_trainer(cfg, run_dir, extra_callbacks=(RunRecord(cfg, resolved, resume),))
    for logger in trainer.loggers:  # the full resolved config beside every run's metrics
        if resume is not None and hasattr(logger, "resume_at"):
            logger.resume_at(resume.at_batch)
        logger.log_hyperparams(resolved)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        pass  # the Preemption callback saved last.ckpt
    stopped_by = next((c.stopped_by for c in trainer.callbacks if getattr(c, "stopped_by", None)), None)
    if stopped_by is None and getattr(trainer, "received_sigterm", False):
        stopped_by = signal.SIGTERM
    finished = stopped_by is None  # at max_steps / max_train_seconds, or by Lightning's own limits (fast_dev_run)
    if rank_zero:
        status = "finished" if finished else f"stopped by {signal.Signals(stopped_by).name}" if stopped_by else "stopped"
        record_event(run_dir, "end", status=status, at_batch=getattr(module, "batch_step", None))
    if not finished:
        # Not a success: a chain such as `stage=autoencoder && stage=diffusion` must not go on with a half-trained
        # model; the exit status is the shell's for the signal (a scheduler's requeue logic reads it as such).
        raise RunInterrupted(stopped_by, f"Not finished: stopped by {signal.Signals(stopped_by).name} at batch "
                                         f"{module.batch_step} of {module.max_steps}, checkpoint saved; rerun the same "
                                         "command to resume")
    if trainer.is_global_zero:
        print(f"Done. Run directory: {run_dir}")
    monitored = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    return float(monitored) if monitored is not None else None
