"""Where the configs live, and how errors reach the user: one line for bad input, a traceback for bugs."""

import errno
import os
import sys
from pathlib import Path

from lightning_ldm.errors import ConfigError, RunInterrupted, UserError
from lightning_ldm.extras import extra_installed, missing_extra_message

# The configs are package data, so an installed wheel finds them as an editable install does; users add their own
# directories to Hydra's search path (--config-dir, hydra.searchpath).
CONFIG_DIR = Path(__file__).resolve().parent / "conf"

# Where the file system refuses (read-only or full output folder, no permission): the user's to fix, in one line.
_USER_FIXABLE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _default_precision() -> str:
    """bf16 autocast on GPUs that support it, full fp32 elsewhere (CPU autocast is slow and rarely wanted)."""
    import torch

    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("ldm.default_precision"):
        OmegaConf.register_new_resolver("ldm.default_precision", _default_precision)
    if not OmegaConf.has_resolver("ldm.first"):  # the first non-null value: oc.select only falls back on missing keys
        OmegaConf.register_new_resolver("ldm.first", lambda *values: next((v for v in values if v is not None), None))


def quiet_known_warnings() -> None:
    """Silence warnings that libraries emit on every run and that the user can do nothing about."""
    import warnings

    for message in (r".*isinstance\(treespec, LeafSpec\).*",  # lightning on torch >= 2.10
                    r".*does not have many workers.*",  # the embedded digits are in memory: workers don't help
                    r".*'set_vital' is deprecated.*",  # torchdata's StatefulDataLoader on recent torch
                    r".*module\(s\) in eval mode at the start of training.*"):  # the frozen first stage and EMA
        warnings.filterwarnings("ignore", message=message)


def _one_line(error: BaseException) -> str:
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0]
        if first not in text:
            text = f"{text} ({first})"
    return text


def print_error(error: BaseException, prefix: str = "") -> None:
    print(f"error: {prefix}{_one_line(error)}", file=sys.stderr)


class TrialFailure(Exception):
    """A sweep trial that failed: its error as one line, without the traceback.

    The traceback's frames hold the failed trial's model, optimizer and batches (GPU memory included);
    Hydra keeps each trial's exception until the sweep ends, so the next trials would run without it.
    """


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def finish_wandb_run(failed: bool) -> None:
    """End this job's W&B run. Lightning's WandbLogger leaves it open, and the next trial of a sweep (same
    process) would find it and log into it instead of starting its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


def _forget_frames(error: BaseException) -> None:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.__traceback__ = None
        error = error.__cause__ or error.__context__


def _check_search_is_a_multirun() -> None:
    """Without -m Hydra ignores the sweeper: the Optuna search would quietly become one ordinary run."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and not in_multirun():
        sweeper = str(HydraConfig.get().get("sweeper", {}).get("_target_", ""))
        if sweeper.endswith("OptunaSweeper"):
            raise ConfigError("hparams_search: an Optuna search runs as a multirun; add -m "
                              "(python -m lightning_ldm -m hparams_search=...)")


class _JobBoundary:
    def __enter__(self):
        register_resolvers()  # under hydra/launcher=slurm a job runs in a fresh process
        _check_search_is_a_multirun()
        if in_multirun():  # what the previous trial left behind (reference cycles, cached GPU blocks)
            import gc

            gc.collect()
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        return self

    def __exit__(self, kind, error, traceback):
        finish_wandb_run(failed=error is not None)
        if not isinstance(error, Exception):  # success, or Ctrl-C / SystemExit: ends a sweep too
            return False
        if not in_multirun():
            user_error = error if isinstance(error, UserError) else error.__cause__  # Hydra wraps constructors'
            if isinstance(user_error, UserError):
                print_error(user_error)
                sys.exit(2)
            return False
        # A sweep trial: report it here, then let Hydra record the trial as failed and go on with the sweep.
        cause = error.__cause__ if isinstance(error.__cause__, UserError) else error  # Hydra wraps constructors'
        if isinstance(cause, UserError):
            print_error(cause)
        else:  # a bug or a resource error (OOM): the trial's own traceback, now, not when the sweep ends
            import traceback as tb

            print("error: trial failed:", file=sys.stderr)
            tb.print_exception(error)
        failure = TrialFailure(f"{type(cause).__name__}: {_one_line(cause)}")
        _forget_frames(error)
        del error, cause, traceback
        raise failure from None


def exit_on_user_error() -> _JobBoundary:
    """The boundary of one job (one run, or one trial of a sweep), around validating and running the task.

    A UserError in a single run ends the process with one line (before Hydra adds its own). In a multirun
    sweep the trial's error is printed and raised as a ``TrialFailure`` instead, so that Hydra records the
    trial as failed and the sweep goes on. Either way the job's W&B run is finished (marked failed if the
    job failed), so that each trial of a sweep is its own run.
    """
    return _JobBoundary()


def run_reporting_errors(hydra_main) -> None:
    """Run a Hydra main function, turning user errors into a single ``error:`` line and exit status 2.

    Hydra prints composition errors over several lines and strips tracebacks from others; asking it for the
    full error lets us see the exception itself and decide: our ``UserError`` and Hydra's config errors are
    the user's to fix (one line), anything else is a bug and keeps its traceback.
    """
    from hydra.errors import HydraException, InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    register_resolvers()
    quiet_known_warnings()
    try:
        hydra_main()
    except UserError as error:
        print_error(error)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as error:
        cause = error.__cause__
        if isinstance(cause, UserError):  # raised inside a constructor that Hydra called
            print_error(cause)
        elif isinstance(error, InstantiationException):
            raise  # a constructor failed for another reason: a bug, keep the traceback
        elif "submitit_slurm" in str(error) and not extra_installed("slurm"):  # the launcher's config is the extra's
            print_error(ConfigError(missing_extra_message("slurm")))
        else:
            print_error(error, prefix="config: ")
        sys.exit(2)
    except RunInterrupted as stop:
        print(str(stop), file=sys.stderr)
        sys.exit(128 + stop.signum)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as error:
        if error.errno not in _USER_FIXABLE_ERRNOS:
            raise
        print_error(error)  # names the file: "[Errno 13] Permission denied: '/path'"
        sys.exit(2)
