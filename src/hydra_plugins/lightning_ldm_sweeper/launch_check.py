"""Refuse a local multirun whose trials train on several devices with DDP.

Lightning starts DDP ranks 1..N-1 by running the process's command line again; under ``-m`` that command
line is the whole sweep, so every rank would launch every trial (a known Lightning + Hydra problem). On
SLURM (hydra/launcher=slurm) srun starts the ranks of each trial's job, and spawn/fork strategies start
them without the command line, so both are fine.
"""

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_ldm.errors import ConfigError

_LAUNCHERS_THAT_START_RANKS = ("SlurmLauncher",)  # hydra-submitit-launcher: one srun task per device
_START_METHODS = ("spawn", "fork", "forkserver", "notebook")


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def device_count(devices: Any, accelerator: Any) -> int:
    """How many devices (processes per node) Lightning will use for ``trainer.devices``."""
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:  # "0,1": device indices
            return len([part for part in text.split(",") if part.strip()])
        if text == "auto":
            return 1 if accelerator == "cpu" else max(_visible_gpus(), 1)
        devices = int(text)
    if devices == -1:  # all of them
        return 1 if accelerator == "cpu" else max(_visible_gpus(), 1)
    return int(devices)


def _starts_ranks_without_command_line(strategy: Any) -> bool:
    if isinstance(strategy, DictConfig):
        return str(strategy.get("start_method", "popen")) in _START_METHODS
    return any(method in str(strategy) for method in _START_METHODS)  # ddp_spawn, ddp_fork, ddp_notebook


def check_multirun_devices(job_cfg: DictConfig) -> None:
    """Raise a one-line ConfigError if this trial would re-run the sweep in every DDP rank."""
    launcher = str(OmegaConf.select(job_cfg, "hydra.launcher._target_", default=""))
    if launcher.endswith(_LAUNCHERS_THAT_START_RANKS) or OmegaConf.select(job_cfg, "trainer") is None:
        return
    devices = OmegaConf.select(job_cfg, "trainer.devices", default=1)
    nodes = OmegaConf.select(job_cfg, "trainer.num_nodes", default=1) or 1
    accelerator = OmegaConf.select(job_cfg, "trainer.accelerator", default="auto")
    strategy = OmegaConf.select(job_cfg, "trainer.strategy", default="auto")
    if device_count(devices, accelerator) * nodes <= 1 or _starts_ranks_without_command_line(strategy):
        return
    where = f"trainer.devices={devices}" + (f" trainer.num_nodes={nodes}" if nodes != 1 else "")
    raise ConfigError(f"{where} in a local multirun (-m): every DDP rank would run the whole sweep again; "
                      "run multi-device trials with hydra/launcher=slurm (one SLURM job per trial) "
                      "or sweep with trainer.devices=1")
