"""The sweepers' config schemas, registered as ``hydra/sweeper=ldm_grid`` and ``hydra/sweeper=ldm_optuna``."""

from dataclasses import dataclass
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class GridSweeperConf:
    _target_: str = "hydra_plugins.lightning_ldm_sweeper.grid_sweeper.GridSweeper"
    max_batch_size: Optional[int] = None  # trials handed to the launcher at once (null: all)
    params: Optional[Dict[str, str]] = None  # swept values in yaml, as on the command line: {module.lr: "1e-3,2e-3"}


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.lightning_ldm_sweeper.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sweeper builds its sampler itself, once it knows that optuna is installed
    study_name: str = "sweep"
    direction: str = "minimize"  # or maximize: what the task returns (the best monitored checkpoint metric)
    n_trials: int = 20  # finished trials the study should have; a rerun only runs those still missing
    n_jobs: int = 1  # trials asked and launched together (in parallel with hydra/launcher=slurm)
    storage: Optional[str] = None  # an Optuna storage URL; null: sqlite:///<sweep dir>/optuna.db
    sampler: Any = None  # a node with _target_ (e.g. optuna.samplers.TPESampler); null: TPE, unseeded
    params: Optional[Dict[str, str]] = None  # the search space, {key: "tag(log, interval(1e-5, 1e-3))"}


ConfigStore.instance().store(group="hydra/sweeper", name="ldm_grid", node=GridSweeperConf, provider="lightning_ldm")
ConfigStore.instance().store(group="hydra/sweeper", name="ldm_optuna", node=OptunaSweeperConf,
                             provider="lightning_ldm")
