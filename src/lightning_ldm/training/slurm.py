"""Lightning's SLURM cluster environment for ``trainer=slurm``; a factory because yaml cannot name a signal."""

import os
import signal
from typing import Literal

from lightning_ldm.errors import ConfigError


def slurm_environment(*, auto_requeue: bool = True,
                      requeue_signal: Literal["SIGUSR1", "SIGUSR2", "SIGHUP", "SIGTERM"] = "SIGUSR1"):
    """``SLURMEnvironment``: srun starts one task per device and Lightning joins them into DDP.

    With ``auto_requeue``, the ``requeue_signal`` (sent by ``#SBATCH --signal=SIGUSR1@120``) saves an
    ``hpc_ckpt_*.ckpt`` and requeues the job. Under hydra/launcher=slurm, submitit owns the requeue
    instead (its own signal, SIGUSR2), and Lightning's handler stays idle.
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if "SLURM_JOB_ID" not in os.environ:
        raise ConfigError("trainer=slurm: not inside a SLURM job (no SLURM_JOB_ID); launch with "
                          "-m hydra/launcher=slurm, or srun in an sbatch script, or use trainer=gpu")
    return SLURMEnvironment(auto_requeue=auto_requeue, requeue_signal=signal.Signals[requeue_signal])
