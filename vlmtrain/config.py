"""Checking a composed config before anything runs: every problem becomes one line naming its key."""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config problem, as one line: '<key>: <what is wrong>'."""


def to_dataclass(node: DictConfig, schema: type, key: str) -> Any:
    """Validate `node` against a dataclass schema and return the dataclass instance."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        full = f"{key}.{exc.full_key}" if exc.full_key else key
        raise ConfigError(f"{full}: {exc.msg.splitlines()[0]}") from None


def check_targets(node: Any, key: str) -> None:
    """Walk `_target_` nodes: every field must be a constructor parameter of a compatible type."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_targets(item, f"{key}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    target = node.get("_target_")
    params, hints = _signature(target, key) if target else ({}, {})
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for name in node:
        if str(name).startswith("_"):
            continue
        child = f"{key}.{name}"
        if OmegaConf.is_missing(node, name):
            raise ConfigError(f"{child}: required but not set")
        value = node[name]
        if target and name not in params and not takes_any:
            raise ConfigError(f"{child}: not a parameter of {target}")
        if target and name in hints:
            _check_type(value, hints[name], child)
        check_targets(value, child)


def _signature(target: str, key: str) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    try:
        obj = get_object(target)
    except Exception:
        raise ConfigError(f"{key}._target_: cannot import {target}") from None
    fn = obj.__init__ if inspect.isclass(obj) else obj
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    return dict(inspect.signature(fn).parameters), hints


_SCALARS = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


def _check_type(value: Any, hint: Any, key: str) -> None:
    options = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )
    if value is None:
        if type(None) not in options:
            raise ConfigError(f"{key}: must not be null")
        return
    scalar_hints = [h for h in options if h in _SCALARS]
    if not scalar_hints or len(scalar_hints) < len([h for h in options if h is not type(None)]):
        return  # containers, modules, unions with non-scalars: left to the constructor
    allowed = tuple(t for h in scalar_hints for t in _SCALARS[h])
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in scalar_hints):
        names = " or ".join(h.__name__ for h in scalar_hints)
        raise ConfigError(f"{key}: expected {names}, got {value!r}")


def check_loss_fits_model(loss: object, model: object) -> None:
    """The loss's required inputs must be among the model's outputs, or the run could never step."""
    params = inspect.signature(loss.forward).parameters.values()
    needed = [
        p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    given = getattr(model, "output_keys", ())
    missing = [name for name in needed if name not in given]
    if missing:
        raise ConfigError(
            f"loss: {type(loss).__name__} needs model outputs {', '.join(missing)}, which {type(model).__name__} "
            f"does not give ({', '.join(given)})"
        )
