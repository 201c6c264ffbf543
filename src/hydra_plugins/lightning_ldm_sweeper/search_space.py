"""The Optuna search space, written in Hydra's sweep syntax (so the same text works in yaml and on the command line).

    choice(a, b, c)  or  a,b,c          categorical
    interval(lo, hi)                    float in [lo, hi]        int(interval(lo, hi)): int in [lo, hi]
    range(start, stop[, step])          int from range(start, stop, step) (stop excluded, as in Python)
    tag(log, interval(...))             sampled on a log scale (also tag(log, range(...)) with step 1)

Anything that is not a sweep is a fixed override passed to every trial.
"""

from dataclasses import dataclass, field
from typing import Any, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer

from lightning_ldm.errors import ConfigError

_CATEGORY_TYPES = (str, int, float, bool)


@dataclass
class SearchSpace:
    distributions: dict[str, Any] = field(default_factory=dict)  # key -> optuna distribution
    fixed: list[str] = field(default_factory=list)  # overrides given to every trial unchanged
    choice_text: dict[str, dict[Any, str]] = field(default_factory=dict)  # categorical value -> override text

    def text(self, key: str, value: Any) -> str:
        """A sampled value as override text (a choice keeps the spelling it was given in)."""
        if value in self.choice_text.get(key, {}):
            return self.choice_text[key][value]
        return repr(value) if isinstance(value, float) else str(value)

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """The overrides of one trial: the fixed ones, then the sampled values."""
        return [*self.fixed, *(f"{key}={self.text(key, value)}" for key, value in params.items())]


def _categorical(key: str, override: Override):
    from optuna.distributions import CategoricalDistribution

    sweep = override.value()
    if override.value_type.name == "GLOB_CHOICE_SWEEP" or "log" in sweep.tags:
        raise ConfigError(f"{key}: glob() and tag(log, choice(...)) are not supported; list the choices")
    values = list(sweep.list)
    if not all(isinstance(v, _CATEGORY_TYPES) for v in values):
        raise ConfigError(f"{key}: choices must be numbers, strings or booleans, got {values}")
    strings = [Transformer.str(v) for v in values]
    return CategoricalDistribution(values), dict(zip(values, strings))


def _integers(key: str, override: Override):
    from optuna.distributions import IntDistribution

    sweep = override.value()
    if not all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
        raise ConfigError(f"{key}: range() over floats is not supported; use interval(lo, hi) or choice(...)")
    numbers = range(sweep.start, sweep.stop, sweep.step)
    if not numbers:
        raise ConfigError(f"{key}: range({sweep.start}, {sweep.stop}, {sweep.step}) is empty")
    return IntDistribution(min(numbers), max(numbers), log="log" in sweep.tags, step=abs(sweep.step))


def _interval(key: str, override: Override):
    from optuna.distributions import FloatDistribution, IntDistribution

    sweep = override.value()
    log = "log" in sweep.tags
    if isinstance(sweep.start, int) and isinstance(sweep.end, int):  # int(interval(lo, hi))
        return IntDistribution(sweep.start, sweep.end, log=log)
    return FloatDistribution(float(sweep.start), float(sweep.end), log=log)


def parse_search_space(arguments: Sequence[str]) -> SearchSpace:
    """``arguments``: ``key=value`` strings, the sweeper's params first; a later one replaces an earlier key."""
    by_key: dict[str, Override] = {}
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        by_key[override.get_key_element()] = override
    space = SearchSpace()
    for key, override in by_key.items():
        try:
            if override.is_choice_sweep():
                space.distributions[key], space.choice_text[key] = _categorical(key, override)
            elif override.is_range_sweep():
                space.distributions[key] = _integers(key, override)
            elif override.is_interval_sweep():
                space.distributions[key] = _interval(key, override)
            else:
                space.fixed.append(f"{key}={override.get_value_element_as_str()}")
        except ValueError as error:  # optuna's check of the bounds (lo > hi, log of a value <= 0)
            raise ConfigError(f"{key}: {error}") from None
    return space
