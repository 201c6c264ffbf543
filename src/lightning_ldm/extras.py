"""Optional features and the pip extra that installs each: ``pip install "lightning_ldm[<extra>]"``.

The core install trains, samples and evaluates; searches, SLURM launches, TensorBoard, diffusers' formats and the demo page need more
packages. A feature whose extra is missing stops with one line that names the extra to install.
"""

import importlib.util

from lightning_ldm.errors import ConfigError

# extra -> (a module it provides, what needs it); pyproject.toml's [project.optional-dependencies] installs them
EXTRAS = {
    "sweeps": ("optuna", "hparams_search (an Optuna study)"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra/launcher=slurm (hydra-submitit-launcher)"),
    "tensorboard": ("tensorboard", "logger=tensorboard"),
    "clip": ("transformers", "conditioning=text_clip (a frozen CLIP text tower from transformers)"),
    "demo": ("gradio", "stage=demo (a local web page made with gradio)"),
    "diffusers": ("diffusers", "weights in from and out to diffusers (autoencoder.path, module.init_from, stage=export)"),
}


def extra_installed(extra: str) -> bool:
    module = EXTRAS[extra][0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a module replaced by None
        return False


def missing_extra_message(extra: str) -> str:
    return f'{EXTRAS[extra][1]} needs the "{extra}" extra: pip install "lightning_ldm[{extra}]"'


def require_extra(extra: str) -> None:
    if not extra_installed(extra):
        raise ConfigError(missing_extra_message(extra))


def import_extra(extra: str):
    """The extra's module (``diffusers``, ``gradio``...), imported; one line naming the extra if it is missing."""
    require_extra(extra)
    return importlib.import_module(EXTRAS[extra][0])


def check_config_extras(cfg) -> None:
    """Before anything runs: every logger the config asks for has its extra installed."""
    for logger in (cfg.get("logger") or {}).values():
        if str(logger.get("_target_", "")).endswith(".tensorboard_logger"):
            require_extra("tensorboard")
