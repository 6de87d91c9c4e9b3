"""vlmtrain-export: a checkpoint or run directory -> a folder other tools load.

Two formats, both with `vlmtrain_config.json` so that `vlmtrain.load_pretrained` reads either:
  open_clip  `open_clip_config.json` + `open_clip_model.safetensors`, loadable with
             `open_clip.create_model_and_transforms('local-dir:DIR')` (and so by CLIP_benchmark)
  vlmtrain   `model.safetensors`, for every model; Hugging Face text towers get their config, weights
             and tokenizer files copied into the folder so that it is self-contained
`auto` writes open_clip's format when it can express the model, else vlmtrain's. The folder is written
under a temporary name and renamed into place, so `--out` never holds a half-written export.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmtrain.atomic import staged_folder
from vlmtrain.checkpoint import FORMATS
from vlmtrain.checkpoint.load import (
    CONFIG_FILE,
    FORMAT_VERSION,
    Source,
    build_model,
    config_node,
    read_source,
    without_pretrained_paths,
)
from vlmtrain.checkpoint.open_clip_format import NotExpressible, OpenClipLayout, check, layout
from vlmtrain.checkpoint.open_clip_format import open_clip_state_dict as to_open_clip


@dataclass
class Exported:
    path: Path
    format: str
    note: str | None = None  # why `auto` did not write open_clip's format


def export(source: str | Path, out: str | Path, fmt: str = "auto", overwrite: bool = False) -> Exported:
    """Export the model in `source` (checkpoint file, run dir or export folder) to the folder `out`."""
    if fmt not in FORMATS:
        raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")
    src = read_source(source)
    model = build_model(src)
    spec, note = _open_clip_layout(model, src.model_config, fmt)
    with staged_folder(out, durable=True) as staging:
        config = without_pretrained_paths(copy.deepcopy(src.model_config))
        if spec is not None:
            _write_open_clip(staging, model, spec)
            meta = {"weights": "open_clip_model.safetensors", "key_prefixes": spec.key_prefixes}
        else:
            meta = {"weights": "model.safetensors", "local_dirs": _bundle_local_dirs(model, config, staging)}
            _save_safetensors(model.state_dict(), staging / "model.safetensors")
        _write_json(staging / CONFIG_FILE, _vlmtrain_config(config, src, meta))
    return Exported(out, "vlmtrain" if spec is None else "open_clip", note)


def _open_clip_layout(
    model: nn.Module, config: dict[str, Any], fmt: str
) -> tuple[OpenClipLayout | None, str | None]:
    """open_clip's layout when asked for and expressible; `auto` falls back to vlmtrain's with a note."""
    if fmt == "vlmtrain":
        return None, None
    try:
        spec = layout(model, config)
        check(model, spec, config)
    except NotExpressible as error:
        if fmt == "open_clip":
            raise
        return None, f"open_clip format cannot express {error}; wrote vlmtrain format"
    return spec, None


def _vlmtrain_config(config: dict[str, Any], src: Source, meta: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "format_version": FORMAT_VERSION,
        "vlmtrain_version": version("vlmtrain"),
        "step": src.step,
        "model": config,
        **meta,
    }


def _write_open_clip(folder: Path, model: nn.Module, spec: OpenClipLayout) -> None:
    _write_json(folder / "open_clip_config.json", spec.config_json())
    _save_safetensors(to_open_clip(model, spec), folder / "open_clip_model.safetensors")


def _bundle_local_dirs(model: nn.Module, config: dict[str, Any], folder: Path) -> list[str]:
    """Hugging Face towers are built from a folder: write one per tower into the export, point the config
    at it (relative, resolved when loading) and return the config keys that were rewritten."""
    from vlmtrain.models.text_encoders import HFTextEncoder

    rewritten = []
    for name, module in model.named_modules():
        if isinstance(module, HFTextEncoder):
            module.transformer.save_pretrained(folder / name)  # config + (trained) weights
            module.tokenizer().tokenizer.save_pretrained(folder / name)
            node, key = config_node(config, f"{name}.path")
            node[key] = name
            rewritten.append(f"{name}.path")
    return rewritten


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        storage = value.untyped_storage().data_ptr()
        if storage in seen:  # safetensors refuses tensors that share memory (tied weights)
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
