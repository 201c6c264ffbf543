"""What both sweepers share: preparing the sweep process, checking trials before launch, and the summary
of what became of each trial (printed, and written to ``<sweep dir>/summary.json``)."""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.lightning_ldm_sweeper.launch_check import check_multirun_devices
from lightning_ldm.cli import TrialFailure, register_resolvers
from lightning_ldm.errors import UserError


def prepare_sweep_process(config: DictConfig) -> None:
    """Let the sweep process resolve ``${hydra:...}`` (our ``paths.output_root`` uses ``hydra:runtime.cwd``).

    Hydra sets this only inside each job, but the sweep directory and the launcher's settings are resolved
    in the sweep process, before any job.
    """
    register_resolvers()
    HydraConfig.instance().set_config(config)


def check_trials(sweeper: Any, batch: Sequence[Sequence[str]]) -> None:
    """Compose every trial of ``batch`` (catching config errors before anything runs) and check its devices."""
    loader = sweeper.hydra_context.config_loader
    for overrides in batch:
        check_multirun_devices(loader.load_sweep_config(master_config=sweeper.config, sweep_overrides=list(overrides)))


@dataclass
class TrialOutcome:
    number: int
    status: str  # "completed" or "failed"
    value: Optional[float]  # what the task returned: the best monitored checkpoint metric
    error: Optional[str]
    params: dict[str, str]  # the swept keys and this trial's values
    run_dir: Optional[str]


def _finite_number(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def outcome_of(number: int, job: JobReturn, swept_keys: Sequence[str]) -> TrialOutcome:
    overrides = dict(item.split("=", 1) for item in job.overrides or [] if "=" in item)
    params = {key: overrides[key] for key in swept_keys if key in overrides}
    run_dir = str(job.hydra_cfg.hydra.runtime.output_dir) if job.hydra_cfg is not None else None
    if job.status == JobStatus.COMPLETED:
        return TrialOutcome(number, "completed", _finite_number(job.return_value), None, params, run_dir)
    error = job._return_value  # the exception; reading .return_value would raise it
    text = str(error) if isinstance(error, TrialFailure) else f"{type(error).__name__}: {error}"
    return TrialOutcome(number, "failed", None, text, params, run_dir)


def monitored_metric(config: DictConfig) -> str:
    """The metric a trial's value is the best of: what its checkpoint callback monitors."""
    return str(OmegaConf.select(config, "callbacks.checkpoint.monitor", default=None) or "value")


def write_summary(sweep_dir: Path, outcomes: Sequence[TrialOutcome], **extra: Any) -> Path:
    path = sweep_dir / "summary.json"
    path.write_text(json.dumps({**extra, "trials": [asdict(o) for o in outcomes]}, indent=2))
    return path


def print_summary(title: str, outcomes: Sequence[TrialOutcome], metric: str, summary_path: Path) -> None:
    failed = sum(o.status == "failed" for o in outcomes)
    print(f"\n{title}: {len(outcomes) - failed} completed, {failed} failed; values are the best {metric} "
          f"({summary_path})")
    for o in outcomes:
        value = "-" if o.value is None else f"{o.value:.6g}"
        params = " ".join(f"{k}={v}" for k, v in o.params.items())
        print(f"  #{o.number:<3} {o.status:<9} {value:<12} {params}" + (f"  [{o.error}]" if o.error else ""))


def raise_if_all_failed(outcomes: Sequence[TrialOutcome], summary_path: Path) -> None:
    statuses = {o.status for o in outcomes}
    if "failed" in statuses and "completed" not in statuses:
        raise UserError(f"all {len(outcomes)} trials of the sweep failed (errors above and in {summary_path})")
