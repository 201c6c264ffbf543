"""Logger factories. W&B goes offline by itself when this machine has no credentials."""

import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Optional

from lightning_ldm import atomic


def wandb_credentials_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].rstrip("/")
    return auth.authenticators(host) is not None


def sweep_job() -> Optional[tuple[str, int]]:
    """``(sweep name, trial number)`` inside a multirun trial, else None. The name is the sweep directory's:
    its start time for a grid sweep, the study name for an Optuna search."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra = HydraConfig.get()
    return Path(str(hydra.sweep.dir)).name, int(hydra.job.num)


def _is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0  # read from RANK / LOCAL_RANK / SLURM_PROCID at import


def wandb_logger(*, save_dir: str, project: str = "lightning_ldm", name: Optional[str] = None,
                 group: Optional[str] = None, tags: Optional[list[str]] = None, job_type: str = "train",
                 offline: Optional[bool] = None, log_model: bool = False, run_id: Optional[str] = None,
                 stage: Optional[str] = None, data: Optional[str] = None, experiment: Optional[str] = None):
    """A Lightning WandbLogger; ``offline=None`` means offline exactly when no credentials are found.

    Runs are tagged ``stage:<stage>``, ``data:<data>``, ``experiment:<name>`` so the project page filters and
    groups them without setup. In a sweep each trial is its own run, grouped by sweep: group
    ``<group>/<sweep name>``, name ``<name>/<trial number>``, and the tag ``sweep:<sweep name>``.
    """
    tags = [*(tags or []), *(f"{key}:{value}" for key, value in
                             (("stage", stage), ("data", data), ("experiment", experiment)) if value)]
    from lightning.pytorch.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE", "")
    if offline is None:
        offline = mode == "offline" or (mode != "online" and not wandb_credentials_available())
    sweep = sweep_job()
    if sweep is not None:
        sweep_name, trial = sweep
        group = f"{group}/{sweep_name}" if group else sweep_name
        name = f"{name}/{trial}" if name else f"{sweep_name}/{trial}"
        tags = [*(tags or []), f"sweep:{sweep_name}"]
    # One W&B run per run directory: a resumed run keeps logging into the run it started. Only rank zero
    # logs, and only it writes the id (SLURM starts all ranks at once: each would write its own).
    id_file = Path(save_dir) / "wandb" / "run_id"
    if run_id is None and id_file.is_file():
        run_id = id_file.read_text().strip()
    if _is_rank_zero():
        run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        atomic.write_text(id_file, run_id)
    logger = WandbLogger(project=project, name=name, group=group, tags=list(tags or []), job_type=job_type,
                         save_dir=save_dir, offline=offline, log_model=log_model, id=run_id, resume="allow")
    # Lightning always passes wandb.init an ``anonymous`` argument (None when unset), and wandb 0.31 prints "The
    # anonymous setting has no effect and will be removed" for any value: every run started with that line.
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    if offline and mode != "disabled":
        print(f"W&B: offline (no credentials found); upload later with: wandb sync {Path(save_dir) / 'wandb'}/offline-run-*")
    return logger


def tensorboard_logger(*, save_dir: str, name: str = "tensorboard", version: str = ""):
    """Lightning's TensorBoardLogger, once the tensorboard extra is known to be installed (Lightning would
    otherwise fail at the first log call, deep inside the run).

    A resumed run writes a new event file beside the old ones, and TensorBoard shows both. What the old files
    hold after the checkpoint the run resumed from was lost with the interruption: ``resume_at`` has the new file
    start with a purge step there, so TensorBoard drops those points instead of drawing two curves.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_ldm.extras import require_extra

    require_extra("tensorboard")

    class ResumableTensorBoardLogger(TensorBoardLogger):
        def resume_at(self, batch: int) -> None:
            self._kwargs["purge_step"] = batch  # read when the SummaryWriter is created, at the first log

    return ResumableTensorBoardLogger(save_dir=save_dir, name=name, version=version)


def csv_logger(*, save_dir: str, name: str = "csv", version: str = ""):
    """Lightning's CSVLogger, continuing ``metrics.csv`` across resumes.

    Lightning's writer deletes an existing ``metrics.csv`` when it starts: a resumed run kept only the steps
    after the resume. This one appends. Rows the old file holds after the checkpoint the run resumes from
    (logged between that checkpoint and a hard kill, then lost with it) are dropped at the resume, so each step
    appears once, as trained.
    """
    import csv

    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.loggers.logger import rank_zero_experiment

    class ContinuingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv; keep it and its header
            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                    self.metrics_keys = list(csv.DictReader(handle).fieldnames or [])

        def drop_rows_after(self, batch: int) -> int:
            if not self._fs.isfile(self.metrics_file_path):
                return 0
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                reader = csv.DictReader(handle)
                fields, rows = reader.fieldnames or [], list(reader)
            kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < batch]
            if len(kept) < len(rows):
                with atomic.atomic_path(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=fields)
                    writer.writeheader()
                    writer.writerows(kept)
            return len(rows) - len(kept)

    class ContinuingCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = ContinuingWriter(log_dir=self.log_dir)
            return self._experiment

        def resume_at(self, batch: int) -> None:
            dropped = self.experiment.drop_rows_after(batch)
            if dropped:
                print(f"CSV log: {dropped} rows logged after batch {batch} (lost with the interruption) removed")

    return ContinuingCSVLogger(save_dir=save_dir, name=name, version=version)


def training_run_of(path: Path) -> Optional[Path]:
    """The run directory a checkpoint or export lies in (``<run>/checkpoints/*.ckpt``, ``<run>/export/*``), if any."""
    path = Path(path).resolve()
    return path.parent.parent if path.parent.name in ("checkpoints", "export") else None


def log_to_training_run(run_dir: Optional[Path], *, metrics: Optional[dict] = None,
                        artifact: Optional[Path] = None, artifact_type: str = "model") -> Optional[str]:
    """Add evaluation ``metrics`` (as ``eval/<name>``, in the history and the summary) and/or a file or folder as a
    W&B artifact to the W&B run that trained ``run_dir``, so a run's page holds its final numbers and weights. Does
    nothing (returns None) when that run logged no W&B run; else returns the run's id. Offline exactly as training
    is: without credentials the additions go to a new offline folder of the same run id, for ``wandb sync``."""
    id_file = None if run_dir is None else Path(run_dir) / "wandb" / "run_id"
    if id_file is None or not id_file.is_file():
        return None
    import wandb
    from omegaconf import OmegaConf

    run_id = id_file.read_text().strip()
    config_file = Path(run_dir) / "config.yaml"
    trained = OmegaConf.load(config_file) if config_file.is_file() else OmegaConf.create()
    project = OmegaConf.select(trained, "logger.wandb.project", default="lightning_ldm")
    mode = os.environ.get("WANDB_MODE", "")
    offline = mode == "offline" or (mode != "online" and not wandb_credentials_available())
    run = wandb.init(dir=str(run_dir), id=run_id, project=project, resume="allow",
                     mode="offline" if offline else "online", settings=wandb.Settings(silent=True))
    try:
        if metrics:
            scalars = {f"eval/{key}": value for key, value in metrics.items() if isinstance(value, (int, float))}
            run.log(scalars)
            run.summary.update(scalars)
        if artifact is not None:
            item = wandb.Artifact(name=f"{Path(run_dir).name}-{Path(artifact).name}".replace("/", "-"),
                                  type=artifact_type)
            (item.add_dir if Path(artifact).is_dir() else item.add_file)(str(artifact))
            run.log_artifact(item)
    finally:
        run.finish()
        # wandb keeps a process-wide setup made from the environment of its first init; a W&B logger started later
        # in this process (Lightning's reads WANDB_MODE when it starts) must get a fresh one
        wandb.teardown()
    where = f"offline (wandb sync {Path(run_dir) / 'wandb'}/offline-run-*)" if offline else "online"
    print(f"W&B: added to the training run {run_id}, {where}")
    return run_id
