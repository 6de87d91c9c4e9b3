"""A saved config is data, not code.

A checkpoint's or export's config came from a file anyone may have written. Before a model is rebuilt
from it, its model section is checked: every `_target_` must be one of vlmtrain's own classes for its
place (a model at the top, an image or text tower under `image_encoder` / `text_encoder`; the allow-list
is `vlmtrain.components`), Hydra's other keys (`_partial_`, `_args_`, `_recursive_`, `_convert_`) and
interpolations are refused, a `_target_` anywhere else is refused, and the values must have the types
of the class's schema (`vlmtrain.schema.target_schema`). Anything else is one line, before any object
is built. The eval sets a saved data config names are read only where they are plain local paths: a
`pipe:` command or a URL is left out unless the user names it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from vlmtrain.components import COMPONENTS, target_name
from vlmtrain.schema import one_line, target_schema

ALLOWED = {kind: {target_name(c): c for c in classes.values()} for kind, classes in COMPONENTS.items()}
TOWERS = ("image_encoder", "text_encoder")  # a model's arguments that are themselves components
PLAIN = (str, int, float, bool, type(None))
REFUSED_KEY = "refused (a saved config only sets the arguments of vlmtrain's own classes)"
EVAL_SOURCES = ("val_shards", "zeroshot_dir", "zeroshot", "retrieval")  # what vlmtrain-eval may default to


class UntrustedConfig(ValueError):
    """A saved config that names something other than vlmtrain's own classes with values of their types."""


def check_model_config(config: Any, where: str) -> None:
    """Refuse `config` (a saved `model` section read from `where`) in one line unless it builds only
    vlmtrain's own model and tower classes, with values of their schema's types."""
    _check_component(config, "model", "model", where)


def _check_component(node: Any, kind: str, key: str, where: str) -> None:
    if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
        raise UntrustedConfig(f"{where}: saved config {key}: not a vlmtrain {_words(kind)} (no _target_)")
    target = ALLOWED[kind].get(node["_target_"])
    if target is None:
        raise UntrustedConfig(
            f"{where}: saved config {key}._target_ refused: not a vlmtrain {_words(kind)} class: "
            f"{_short(node['_target_'])}"
        )
    for name, value in node.items():
        if name == "_target_":
            continue
        if not isinstance(name, str) or name.startswith("_"):  # _partial_, _args_, _recursive_, ...
            raise UntrustedConfig(f"{where}: saved config {key}.{_short(str(name))}: {REFUSED_KEY}")
        if kind == "model" and name in TOWERS:
            _check_component(value, name, f"{key}.{name}", where)
        else:
            _check_plain(value, f"{key}.{name}", where)
    values = {k: v for k, v in node.items() if not (kind == "model" and k in TOWERS)}
    try:
        OmegaConf.merge(OmegaConf.structured(target_schema(target)), values)
    except OmegaConfBaseException as error:
        raise UntrustedConfig(f"{where}: saved config {key}: {one_line(str(error))}") from None


def _check_plain(value: Any, key: str, where: str) -> None:
    """Plain values only: no Hydra key (`_target_`, `_partial_`, `_args_`, ...) at any depth and no
    interpolation."""
    if isinstance(value, dict):
        for name, inner in value.items():
            if not isinstance(name, str) or name.startswith("_"):
                raise UntrustedConfig(f"{where}: saved config {key}.{_short(str(name))}: {REFUSED_KEY}")
            _check_plain(inner, f"{key}.{name}", where)
    elif isinstance(value, list | tuple):
        for index, inner in enumerate(value):
            _check_plain(inner, f"{key}[{index}]", where)
    elif not isinstance(value, PLAIN):
        raise UntrustedConfig(f"{where}: saved config {key}: a {type(value).__name__}, not a plain value")
    elif isinstance(value, str) and "${" in value:
        raise UntrustedConfig(f"{where}: saved config {key}: refused interpolation {_short(value)}")


def build_saved_model(config: dict[str, Any], where: str) -> nn.Module:
    """The model a checked saved config describes (checked again here: nothing else is ever built)."""
    from vlmtrain.build import build

    check_model_config(config, where)
    model = build(OmegaConf.create(config), "model")
    if not isinstance(model, nn.Module):
        raise UntrustedConfig(f"{where}: saved config model: built a {type(model).__name__}, not a model")
    return model


def eval_sources(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The eval sets of a saved data config that are plain local paths, and the keys left out (`pipe:`
    commands, URLs, anything not a string): reading a local file runs nothing, the rest would."""
    kept: dict[str, Any] = {}
    left_out: list[str] = []
    for key in EVAL_SOURCES:
        value = data.get(key)
        if isinstance(value, dict):
            kept[key] = {name: where for name, where in value.items() if _local(where)}
            left_out += [f"data.{key}.{name}" for name in value if name not in kept[key]]
        elif value is not None:
            if _local(value):
                kept[key] = value
            else:
                left_out.append(f"data.{key}")
    return kept, left_out


def _local(spec: Any) -> bool:
    """Local paths only: no part of a '::'-joined spec is a `pipe:` command or a URL (erring towards
    leaving a spec out)."""
    return isinstance(spec, str) and "pipe:" not in spec and "://" not in spec


def _words(kind: str) -> str:
    return kind.replace("_", " ").replace("encoder", "tower")


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
