"""Check a composed config before anything runs: unknown keys and wrong types stop the run in one line.

Top-level keys are checked against the ``RunConfig`` dataclass. Every node with a ``_target_`` is checked
against the target's signature: each key must name a parameter, and each plain value must match the
parameter's annotation. Missing required values (``???``) are reported by their full key.
"""

import collections.abc
import dataclasses
import difflib
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_ldm.config.schema import RunConfig
from lightning_ldm.errors import ConfigError

_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def validate_config(cfg: DictConfig) -> None:
    _check_dataclass(cfg, RunConfig, prefix="")
    _walk(cfg, prefix="")


def _suggest(key: str, options) -> str:
    options = [o for o in options if o != "self"]
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(options)})"


def _check_dataclass(node: DictConfig, schema: type, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in node.keys():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{full}: unknown config key{_suggest(str(key), fields)}")
        if dataclasses.is_dataclass(hints[key]):
            child = node._get_node(key)
            if not isinstance(child, DictConfig):
                raise ConfigError(f"{full}: expected a group of keys, got {_show(child)}")
            _check_dataclass(child, hints[key], prefix=f"{full}.")
        elif hints[key] is not Any:
            _check_value(node, key, hints[key], full)
            _check_minimum(node, key, fields[key].metadata.get("min"), full)


def _walk(node: Any, prefix: str) -> None:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            _check_target_node(node, prefix)
        for key in node.keys():
            if key in _HYDRA_KEYS:
                continue
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                _walk(child, f"{prefix}{key}.")
    elif isinstance(node, ListConfig):
        for index, child in enumerate(node._iter_ex(resolve=False)):
            _walk(child, f"{prefix}{index}.")


def _target_signature(target: str, where: str) -> tuple[Optional[inspect.Signature], Any]:
    try:
        obj = get_object(target)
    except Exception as error:  # ImportError, AttributeError, ...
        raise ConfigError(f"{where}_target_: cannot import '{target}' ({error})") from None
    try:
        return inspect.signature(obj), obj
    except (TypeError, ValueError):
        return None, obj


def _check_target_node(node: DictConfig, prefix: str) -> None:
    target = node._get_node("_target_")._value()
    signature, obj = _target_signature(str(target), prefix)
    if signature is None:
        return
    params = signature.parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # unresolvable forward references in third-party code
        hints = {}
    name = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', target)}"
    for key in node.keys():
        if key in _HYDRA_KEYS:
            continue
        full = f"{prefix}{key}"
        if key not in params:
            if takes_kwargs:
                continue
            raise ConfigError(f"{full}: unknown key for {name}{_suggest(str(key), params)}")
        if key in hints:
            _check_value(node, key, hints[key], full)
    if node.get("_partial_", False):
        return
    for pname, param in params.items():
        if param.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        if param.default is inspect.Parameter.empty and pname not in node and pname != "self":
            if pname in ("callbacks", "logger", "plugins"):  # passed by the task, not the config
                continue
            raise ConfigError(f"{prefix}{pname}: required by {name} but not set")


def _check_value(node: DictConfig, key: str, annotation: Any, full: str) -> None:
    child = node._get_node(key)
    if child is None:
        return
    if OmegaConf.is_missing(node, key):
        raise ConfigError(f"{full}: required value is not set (add {full}=...)")
    if isinstance(child, DictConfig) and "_target_" in child:
        return  # an object built by Hydra; its own keys are checked when walked
    try:
        value = node[key]
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except Exception as error:
        raise ConfigError(f"{full}: cannot resolve value ({error})") from None
    if not _matches(value, annotation):
        raise ConfigError(f"{full}: expected {_type_name(annotation)}, got {_show(value)}")


def _check_minimum(node: DictConfig, key: str, minimum: Optional[int], full: str) -> None:
    if minimum is None or OmegaConf.is_missing(node, key):
        return
    value = node[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < minimum:
        raise ConfigError(f"{full}: must be at least {minimum}, got {value}")


def _matches(value: Any, annotation: Any) -> bool:
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Union or isinstance(annotation, types.UnionType):
        return any(_matches(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is Path:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return all(_matches(v, inner) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    if annotation is dict:
        return isinstance(value, dict)
    # Anything else (classes, Iterable[...], callables) is left to the target itself: a false alarm here
    # would block a valid run, while a wrong value still fails at instantiation.
    return True


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union or isinstance(annotation, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"
