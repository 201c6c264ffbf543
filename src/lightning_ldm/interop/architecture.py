"""The architecture other codebases' files do not carry: our constructor kwargs, or the name of one of our presets."""

from collections.abc import Mapping
from typing import Any, Callable, TypeVar, Union

from lightning_ldm.errors import ConfigError

Architecture = Union[str, Mapping[str, Any]]
Model = TypeVar("Model")


def build(model_class: Callable[..., Model], presets: Mapping[str, Mapping[str, Any]], config: Architecture,
          what: str) -> Model:
    """model_class(**config), or of a preset name; an unknown preset or kwarg is one ConfigError line."""
    if isinstance(config, str):
        if config not in presets:
            raise ConfigError(f"unknown {what} preset {config!r}; presets: {', '.join(presets)}")
        config = presets[config]
    try:
        return model_class(**config)
    except TypeError as error:
        raise ConfigError(f"{what} architecture {dict(config)}: {error}") from None
