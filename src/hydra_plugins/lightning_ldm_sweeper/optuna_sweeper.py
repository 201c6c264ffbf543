"""``hydra/sweeper=ldm_optuna``: an Optuna study over the value the task returns, resumable from its storage.

Each trial is one job, in ``<sweep dir>/<trial number>`` with its own W&B run. The task returns the best
monitored checkpoint metric; a trial that raises, or returns no finite number, is told to the study as FAIL
and the sweep goes on. The study lives in ``storage`` (default ``sqlite:///<sweep dir>/optuna.db``) under
``study_name``. ``n_trials`` is the number of finished trials the study should have: rerunning the same
command after an interruption runs only the missing ones, and a larger ``n_trials`` extends a finished
study. Run one sweep process per study (trials it finds still running are not counted as finished).
"""

from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.lightning_ldm_sweeper.search_space import SearchSpace, parse_search_space
from hydra_plugins.lightning_ldm_sweeper.trials import (TrialOutcome, check_trials, monitored_metric,
                                                        outcome_of, prepare_sweep_process, print_summary,
                                                        raise_if_all_failed, write_summary)
from lightning_ldm.errors import ConfigError
from lightning_ldm.extras import require_extra

_NO_METRIC = "the task returned no metric (does a checkpoint callback monitor one?)"


class OptunaSweeper(Sweeper):
    def __init__(self, study_name: str, direction: str = "minimize", n_trials: int = 20, n_jobs: int = 1,
                 storage: Optional[str] = None, sampler: Any = None, params: Optional[dict] = None) -> None:
        require_extra("sweeps")
        if direction not in ("minimize", "maximize"):
            raise ConfigError(f"hydra.sweeper.direction={direction}: expected minimize or maximize")
        if n_trials < 1 or n_jobs < 1:
            raise ConfigError(f"hydra.sweeper: n_trials={n_trials} and n_jobs={n_jobs} must be at least 1")
        self.study_name, self.direction, self.n_trials, self.n_jobs = study_name, direction, n_trials, n_jobs
        self.storage, self.params = storage, dict(params or {})
        self.sampler = instantiate(sampler) if sampler is not None else None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        prepare_sweep_process(config)
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def _load_study(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the summary says what matters
        storage = self.storage or f"sqlite:///{self.sweep_dir / 'optuna.db'}"
        if storage.startswith("sqlite:///"):
            Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(study_name=self.study_name, storage=storage, direction=self.direction,
                                    sampler=self.sampler or optuna.samplers.TPESampler(), load_if_exists=True)
        if study.direction.name.lower() != self.direction:
            raise ConfigError(f"hydra.sweeper.direction={self.direction}: study '{self.study_name}' in {storage} "
                              f"was created to {study.direction.name.lower()}; pick another study_name")
        return study, storage

    def sweep(self, arguments: list[str]) -> Any:
        from optuna.trial import TrialState

        space = parse_search_space([*(f"{key}={value}" for key, value in self.params.items()), *arguments])
        if not space.distributions:
            raise ConfigError("hydra.sweeper.params: nothing to search; give e.g. "
                              "module.lr='tag(log, interval(1e-5, 1e-3))'")
        study, storage = self._load_study()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        done = sum(t.state in finished for t in study.get_trials(deepcopy=False))
        print(f"Optuna study '{self.study_name}' ({storage}): {done} of {self.n_trials} trials finished"
              + ("; resuming" if done else ""))
        returns = []
        while done < self.n_trials:
            trials = [study.ask(space.distributions) for _ in range(min(self.n_jobs, self.n_trials - done))]
            returns.append(self._run(study, trials, space))
            done += len(trials)
        outcomes = self._study_outcomes(study, space)
        best = study.best_trial if any(o.status == "completed" for o in outcomes) else None
        metric = monitored_metric(self.config)
        summary = write_summary(self.sweep_dir, outcomes, study=self.study_name, storage=storage,
                                direction=self.direction, metric=metric,
                                best=None if best is None else {"number": best.number, "value": best.value})
        print_summary(f"Optuna study '{self.study_name}'", outcomes, metric, summary)
        if best is not None:
            params = " ".join(f"{key}={space.text(key, value)}" for key, value in best.params.items())
            print(f"Best: #{best.number} value={best.value:.6g} {params} ({best.user_attrs.get('run_dir')})")
        raise_if_all_failed(outcomes, summary)
        return returns

    def _run(self, study, trials: Sequence[Any], space: SearchSpace) -> list:
        """Launch one batch of asked trials and tell the study how each ended."""
        from optuna.trial import TrialState

        batch = [space.overrides(trial.params) for trial in trials]
        try:
            check_trials(self, batch)
            results = self._launch(trials, batch)
        except BaseException:  # a config error, Ctrl-C, a launcher failure: don't leave them RUNNING
            for trial in trials:
                study.tell(trial, state=TrialState.FAIL)
            raise
        for trial, job in zip(trials, results):
            outcome = outcome_of(trial.number, job, list(space.distributions))
            if outcome.status == "completed" and outcome.value is None:
                outcome.status, outcome.error = "failed", _NO_METRIC
            trial.set_user_attr("run_dir", outcome.run_dir)
            if outcome.error:
                trial.set_user_attr("error", outcome.error)
            if outcome.status == "completed":
                study.tell(trial, outcome.value)
            else:
                study.tell(trial, state=TrialState.FAIL)
        return list(results)

    def _launch(self, trials: Sequence[Any], batch: list[list[str]]) -> Sequence[Any]:
        """Launch with job number = trial number, so that each trial's directory is named by its number."""
        numbers = [trial.number for trial in trials]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return self.launcher.launch(batch, initial_job_idx=numbers[0])
        return [self.launcher.launch([overrides], initial_job_idx=n)[0] for n, overrides in zip(numbers, batch)]

    @staticmethod
    def _study_outcomes(study, space: SearchSpace) -> list[TrialOutcome]:
        from optuna.trial import TrialState

        status = {TrialState.COMPLETE: "completed", TrialState.FAIL: "failed", TrialState.PRUNED: "failed"}
        return [TrialOutcome(number=t.number, status=status.get(t.state, t.state.name.lower()), value=t.value,
                             error=t.user_attrs.get("error"),
                             params={k: space.text(k, v) for k, v in t.params.items()},
                             run_dir=t.user_attrs.get("run_dir"))
                for t in study.get_trials(deepcopy=False)]
