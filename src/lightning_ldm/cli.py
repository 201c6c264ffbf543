"""Where the configs live, and how errors reach the user: one line for bad input, a traceback for bugs."""

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from lightning_ldm.errors import UserError

# An editable install (the supported way) runs from the repository, whose conf/ sits beside src/.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


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


def quiet_known_warnings() -> None:
    """Silence warnings that libraries emit on every run and that the user can do nothing about."""
    import warnings

    for message in (r".*isinstance\(treespec, LeafSpec\).*",  # lightning on torch >= 2.10
                    r".*does not have many workers.*",  # the embedded digits are in memory: workers don't help
                    r".*Experiment logs directory .* exists and is not empty.*"):  # resumed runs
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


@contextmanager
def exit_on_user_error():
    """Inside a single run, a UserError ends the process with one line (before Hydra adds its own).

    In a multirun sweep the error is re-raised instead, so Hydra records that trial as failed and goes on.
    """
    try:
        yield
    except UserError as error:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        print_error(error)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(2)


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
        else:
            print_error(error, prefix="config: ")
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
