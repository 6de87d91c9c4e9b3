"""The one loading path for trained models: `load_pretrained(path) -> (model, eval transform, tokenizer)`.

`path` is any of: an export folder written by `vlmtrain-export` (either format), a training checkpoint
file, a sharded checkpoint's step folder (read whole in this process), or a run directory (its newest
checkpoint, a file or a step folder, that reads). An export folder describes itself in
`vlmtrain_config.json`: the model's config (with `_target_`s), the weights file, how the weight names in
that file map onto the model's, and which config values are folders inside the export. Either config is
data: it builds only vlmtrain's own classes (`saved_config`), checked before anything is built.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from vlmtrain.checkpoint.kinds import METADATA
from vlmtrain.checkpoint.manager import read_checkpoint, read_newest
from vlmtrain.checkpoint.saved_config import (
    UntrustedConfig,
    build_saved_model,
    check_model_config,
    eval_sources,
)

CONFIG_FILE = "vlmtrain_config.json"
FORMAT_VERSION = 1
KeyPrefixes = Sequence[tuple[str, str]]


@dataclass
class Source:
    """What a model is built from: its config, a weights dict and how the weights' names map."""

    path: Path
    model_config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    key_prefixes: KeyPrefixes = ()
    data_config: dict[str, Any] = field(default_factory=dict)
    step: int | None = None


@dataclass
class Pretrained:
    model: nn.Module
    transform: Callable
    tokenizer: Callable
    source: Path  # the checkpoint file or export folder that was read
    data_config: dict[str, Any]  # the training run's eval sets that are local paths; empty for exports
    left_out: list[str] = field(default_factory=list)  # its eval sets that are commands or URLs


def file_key(key: str, prefixes: KeyPrefixes) -> str:
    """The name a model's state-dict `key` has in a weights file: the first matching prefix is renamed."""
    for ours, theirs in prefixes:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return key


def read_source(path: str | Path) -> Source:
    """The model config and weights at `path`; the config is checked (UntrustedConfig) before returning."""
    path = Path(path).expanduser()
    if (path / CONFIG_FILE).is_file():
        return _read_export(path)
    if (path / "open_clip_config.json").is_file():
        raise ValueError(
            f"{path}: an open_clip folder without {CONFIG_FILE}; load it with "
            f"open_clip.create_model_and_transforms('local-dir:{path}')"
        )
    if (path / METADATA).is_file():
        return _sharded_source(path)
    if path.is_dir():
        return _newest_source(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint, run directory or export folder: {path}")
    return _checkpoint_source(path, read_checkpoint(path, follow_links=True))  # a file the user named


def _sharded_source(folder: Path) -> Source:
    """A sharded checkpoint's step folder, read whole in this process (no process group)."""
    from vlmtrain.checkpoint.sharded_full import read_full_checkpoint

    return _checkpoint_source(folder, read_full_checkpoint(folder))


def _newest_source(run_dir: Path) -> Source:
    """The run's newest checkpoint that reads, of either kind (a step file, or a sharded run's folder)."""
    checkpoints = run_dir / "checkpoints"
    newest = read_newest(checkpoints)
    if newest is None:
        raise FileNotFoundError(f"{run_dir}: no {CONFIG_FILE} and no checkpoints under {checkpoints}")
    return _checkpoint_source(*newest)


def _checkpoint_source(path: Path, saved: dict[str, Any]) -> Source:
    if not isinstance(saved, dict) or "model" not in saved or "model" not in (saved.get("config") or {}):
        raise ValueError(f"{path}: not a vlmtrain training checkpoint (needs 'model' and 'config.model')")
    config = saved["config"]
    check_model_config(config["model"], str(path))
    return Source(
        path=path,
        model_config=config["model"],
        weights=saved["model"],
        data_config=config.get("data") or {},
        step=(saved.get("train_state") or {}).get("step"),
    )


def _read_export(root: Path) -> Source:
    from safetensors.torch import load_file

    meta = json.loads((root / CONFIG_FILE).read_text())
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(
            f"{root / CONFIG_FILE}: format_version {version}, this vlmtrain reads {FORMAT_VERSION}"
        )
    where = str(root / CONFIG_FILE)
    check_model_config(meta.get("model"), where)
    weights = _inside(root, meta.get("weights"), f"{where}: weights")
    if not weights.is_file():
        raise FileNotFoundError(f"{root}: missing weights file {meta['weights']}")
    config = copy.deepcopy(meta["model"])
    for dotted in meta.get("local_dirs", []):  # stored relative to the export so the folder can move
        try:
            node, key = config_node(config, dotted)
            node[key] = str(_inside(root, node[key], f"{where}: local_dirs {dotted}"))
        except (KeyError, TypeError, AttributeError):
            raise UntrustedConfig(
                f"{where}: local_dirs names {dotted!r}, not a key of the model config"
            ) from None
    return Source(
        path=root,
        model_config=config,
        weights=load_file(str(weights)),
        key_prefixes=[tuple(pair) for pair in meta.get("key_prefixes", [])],
        step=meta.get("step"),
    )


def _inside(root: Path, name: Any, what: str) -> Path:
    """`root / name`, for a relative name that stays inside the export folder (links resolved)."""
    inside = isinstance(name, str) and not Path(name).is_absolute()
    if inside:
        path = (root / name).resolve()
        inside = path.is_relative_to(root.resolve())
    if not inside:
        raise UntrustedConfig(f"{what}: {str(name)[:80]!r} is not a path inside the export folder")
    return root / name


def config_node(config: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
    """Where a dotted key lives: "text_encoder.path" -> (config["text_encoder"], "path")."""
    *parents, key = dotted.split(".")
    for part in parents:
        config = config[part]
    return config, key


def without_pretrained_paths(config: Any) -> Any:
    """A copy with every `pretrained_path` cleared: the full weights are loaded after building."""
    if isinstance(config, dict):
        return {k: None if k == "pretrained_path" else without_pretrained_paths(v) for k, v in config.items()}
    if isinstance(config, list):
        return [without_pretrained_paths(v) for v in config]
    return config


def build_model(source: Source) -> nn.Module:
    """Instantiate the config and load every weight strictly (in eval mode, on CPU)."""
    model = build_saved_model(without_pretrained_paths(source.model_config), str(source.path))
    own = model.state_dict()
    names = {key: file_key(key, source.key_prefixes) for key in own}
    missing = sorted(name for name in names.values() if name not in source.weights)
    unexpected = sorted(set(source.weights) - set(names.values()))
    if missing or unexpected:
        raise ValueError(
            f"{source.path}: weights do not match the model config "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    weights = {key: _shaped(source.weights[name], own[key]) for key, name in names.items()}
    model.load_state_dict(weights, strict=True)
    return model.eval()


def _shaped(value: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """A sharded model holds its scalars (temperature, bias) as 1-element vectors: back to scalars."""
    return value.reshape(own.shape) if value.numel() == 1 == own.numel() else value


def open_pretrained(path: str | Path) -> Pretrained:
    """Like `load_pretrained`, also saying which file was read and the run's data config (for defaults)."""
    from vlmtrain.data.transforms import transforms_for

    source = read_source(path)
    model = build_model(source)
    _, transform, _ = transforms_for(model.image_encoder)
    data, left_out = eval_sources(source.data_config)
    return Pretrained(model, transform, model.text_encoder.tokenizer(), source.path, data, left_out)


class LoadedModel(NamedTuple):
    """What `load_pretrained` gives: by name (`.model`) or unpacked (`model, transform, tokenizer = ...`)."""

    model: nn.Module  # in eval mode
    transform: Callable  # PIL image -> the tensor the model's image tower takes (its eval transform)
    tokenizer: Callable  # list of texts -> token ids for the model's text tower


def load_pretrained(path: str | Path) -> LoadedModel:
    """The model in eval mode, its eval image transform and its tokenizer, from an export folder,
    checkpoint or run directory."""
    loaded = open_pretrained(path)
    return LoadedModel(loaded.model, loaded.transform, loaded.tokenizer)
