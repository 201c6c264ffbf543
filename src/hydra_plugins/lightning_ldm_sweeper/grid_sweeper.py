"""``hydra/sweeper=ldm_grid``: Hydra's grid sweep, where a failed trial doesn't end the sweep.

Hydra's basic sweeper re-raises the first failed trial once its batch has run, which ends the sweep with a
traceback and no account of the other trials. This one records every trial's outcome, prints a summary at
the end, and fails (one line, exit status 2) only when every trial failed.
"""

from pathlib import Path
from typing import Any, List

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.lightning_ldm_sweeper.trials import (check_trials, monitored_metric, outcome_of,
                                                        prepare_sweep_process, print_summary,
                                                        raise_if_all_failed, write_summary)


class GridSweeper(BasicSweeper):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        prepare_sweep_process(config)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        params = [f"{key}={value}" for key, value in (self.params or {}).items()]
        overrides = parser.parse_overrides([*params, *arguments])
        swept_keys = [o.get_key_element() for o in overrides if o.is_sweep_override()]
        batches = self.split_arguments(overrides, self.max_batch_size)
        for batch in batches:  # every trial composes and none would relaunch the sweep, before any runs
            check_trials(self, batch)

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        print(f"Sweep of {sum(map(len, batches))} trials in {sweep_dir}")

        metric = monitored_metric(self.config)
        outcomes, returns = [], []
        for batch in batches:
            first = len(outcomes)
            results = self.launcher.launch(batch, initial_job_idx=first)
            outcomes += [outcome_of(first + i, job, swept_keys) for i, job in enumerate(results)]
            returns.append(results)
            summary = write_summary(sweep_dir, outcomes, metric=metric)
        print_summary("Sweep", outcomes, metric, summary)
        raise_if_all_failed(outcomes, summary)
        return returns
