"""The two kinds of step checkpoint in a run's `checkpoints/` folder, and a run's state carried from one to
the other: `step_N.pt` files (trainer.parallel=ddp: every part in one file) and `step_N/` folders (fsdp:
every rank's shards, the other parts beside them in `run_state.pt`; complete once their metadata is
written). A run resumes from the newest of either kind, and keeps `keep_last` of both together.

The optimizer's state is keyed by parameter index in a file (`Optimizer.state_dict`) and by parameter name
in a folder (torch.distributed.checkpoint's): the two map through the optimizer's parameter groups, in
order, named by the model's parameters; a state that does not map onto every parameter is refused in one
line. A sharded model holds its 0-d parameters (temperature, bias) as 1-element vectors, so their values
take the shape of the model they are loaded into.

Imports nothing of torch.distributed: the tools that read checkpoint files list steps without it.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmtrain.schema import ConfigError

STEP_FILE = re.compile(r"step_(\d+)\.pt")  # the whole name (fullmatch)
STEP_FOLDER = re.compile(r"step_(\d+)")  # the whole name (fullmatch)
METADATA = ".metadata"  # a step folder's, written last
SHARDED = ("model", "optimizer")  # the parts a step folder holds as shards
TEMP_FILES = (".step_*.pt.tmp*", ".latest.tmp*")  # the files a killed write leaves
TEMP_FOLDERS = (".step_*.tmp", ".step_*.old")  # and the folders
COUNTERS = ("step",)  # per-parameter optimizer values that are counters, not parameter-shaped
Groups = list[list[str]]  # the parameter names of each of an optimizer's groups, in order


def step_number(path: Path) -> int:
    """The step of a `step_N.pt` file or `step_N/` folder."""
    match = STEP_FILE.fullmatch(path.name) or STEP_FOLDER.fullmatch(path.name)
    return int(match.group(1))


def is_step_folder(path: Path) -> bool:
    return STEP_FOLDER.fullmatch(path.name) is not None


def step_files(directory: str | Path) -> list[Path]:
    """The entries of `directory` named like step files, oldest first (what they are is for the reader
    to check: a link or a FIFO is refused when read)."""
    directory = Path(directory)
    try:
        names = [p.name for p in directory.iterdir() if STEP_FILE.fullmatch(p.name)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [directory / name for name in sorted(names, key=lambda n: int(STEP_FILE.fullmatch(n).group(1)))]


def step_folders(directory: str | Path) -> list[Path]:
    """The complete step folders in `directory` (their metadata written last), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if STEP_FOLDER.fullmatch(p.name) and _complete(p)]
    return sorted(found, key=step_number)


def _complete(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and (folder / METADATA).is_file()


def newest_first(directory: str | Path, named: Path | None, sharded: bool) -> list[Path]:
    """Both kinds' checkpoints in `directory`, newest first: `named` (what `latest` names) if it is one,
    then every other by step; at the same step the run's own kind first (folders when `sharded`)."""
    entries = step_files(directory) + step_folders(directory)
    ordered = sorted(entries, key=lambda p: (step_number(p), is_step_folder(p) == sharded), reverse=True)
    return [p for p in ordered if p == named] + [p for p in ordered if p != named]


def sweep(directory: str | Path) -> list[Path]:
    """Remove the temporary files and folders that killed writes of either kind left; those removed
    (a link is never followed)."""
    directory = Path(directory)
    files = [p for pattern in TEMP_FILES for p in directory.glob(pattern)]
    folders = [p for pattern in TEMP_FOLDERS for p in directory.glob(pattern)]
    for path in files:
        path.unlink(missing_ok=True)
    for path in folders:
        shutil.rmtree(path, ignore_errors=True)
    return files + folders


def prune(directory: str | Path, keep_last: int) -> None:
    """Remove the checkpoints of either kind beyond the newest `keep_last` (0: keep all): after a run
    changed kind, its older checkpoints of the other kind go as its own new ones come."""
    if keep_last <= 0:
        return
    entries = sorted(step_files(directory) + step_folders(directory), key=step_number)
    for old in entries[:-keep_last]:
        if is_step_folder(old):
            shutil.rmtree(old)
        else:
            old.unlink(missing_ok=True)


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> Groups:
    """The names (the model's) of the parameters of each of the optimizer's groups, in order."""
    names = {id(param): name for name, param in model.named_parameters()}
    unnamed = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in names]
    if unnamed:
        raise ValueError(f"the optimizer holds {len(unnamed)} parameter(s) that are not the model's")
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def by_name(state: Mapping[str, Any], groups: Groups, where: str | Path) -> dict[str, Any]:
    """An optimizer state keyed by parameter index (a file's) keyed by name instead, for an optimizer
    whose groups hold the parameters `groups` names; a state that does not map onto them is refused
    (ConfigError, naming `where`)."""
    saved = _saved_groups(state, groups, where)
    for number, (indices, names) in enumerate(zip(saved, groups)):
        if len(indices) != len(names) or len(set(indices)) != len(indices):
            _refuse(where, f"group {number} holds {len(indices)} parameter(s) saved, {len(names)} now")
    name_of = {index: name for indices, names in zip(saved, groups) for index, name in zip(indices, names)}
    _check_keys(state["state"], name_of, where)
    return {
        "state": {name_of[index]: values for index, values in state["state"].items()},
        "param_groups": [
            group | {"params": list(names)} for group, names in zip(state["param_groups"], groups)
        ],
    }


def by_index(state: Mapping[str, Any], groups: Groups, where: str | Path) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (a folder's) keyed by index instead, as
    `Optimizer.state_dict` numbers the parameters of `groups`: in order, over the groups; a state that
    does not map onto them is refused (ConfigError, naming `where`)."""
    saved = _saved_groups(state, groups, where)
    for number, (names_saved, names) in enumerate(zip(saved, groups)):
        if sorted(names_saved) != sorted(names):
            differ = sorted(set(names_saved) ^ set(names)) or ["a parameter saved twice"]
            _refuse(where, f"group {number}: {differ[0]} is not in both the checkpoint and this run")
    index_of = {name: index for index, name in enumerate(chain.from_iterable(groups))}
    _check_keys(state["state"], index_of, where)
    indices = iter(range(len(index_of)))
    return {
        "state": {index_of[name]: values for name, values in state["state"].items()},
        "param_groups": [
            group | {"params": [next(indices) for _ in names]}
            for group, names in zip(state["param_groups"], groups)
        ],
    }


def _saved_groups(state: Mapping[str, Any], groups: Groups, where: str | Path) -> list[list]:
    saved = [list(group.get("params", ())) for group in state.get("param_groups", ())]
    if len(saved) != len(groups) or not isinstance(state.get("state"), Mapping):
        _refuse(where, f"{len(saved)} parameter group(s) saved, {len(groups)} now")
    return saved


def _check_keys(values: Mapping, known: Mapping, where: str | Path) -> None:
    unknown = [key for key in values if key not in known]
    if unknown:
        _refuse(where, f"state for {unknown[0]!r}, not a parameter of its groups")


def _refuse(where: str | Path, detail: str) -> None:
    raise ConfigError(
        f"{where}: its optimizer state does not match this run's parameters ({detail}); resume with the "
        "model and optimizer it was saved with, or start a new run_dir"
    )


def shaped(weights: Mapping[str, Any], shapes: Mapping[str, torch.Size]) -> dict[str, Any]:
    """Weights with each 1-element tensor in the shape `shapes` gives its name (a scalar <-> a
    1-element vector); the rest as they are."""
    return {name: _reshaped(value, shapes.get(name)) for name, value in weights.items()}


def optimizer_shaped(
    state: Mapping[str, Any], shapes: Mapping[str, torch.Size], where: str | Path
) -> dict[str, Any]:
    """A name-keyed optimizer state with each parameter's values in the shape `shapes` gives the
    parameter (a scalar <-> a 1-element vector; its step counters as they are); a value of another
    size (the state of another parameter) is refused (ConfigError, naming `where`)."""
    values = {}
    for name, per_param in state["state"].items():
        shape = shapes.get(name)
        sized = {k: v for k, v in per_param.items() if isinstance(v, torch.Tensor) and k not in COUNTERS}
        for key, value in sized.items():
            if shape is not None and value.numel() != shape.numel():
                _refuse(
                    where, f"{name}: its {key} holds {value.numel()} values, its parameter {shape.numel()}"
                )
        values[name] = per_param | {k: _reshaped(v, shape) for k, v in sized.items()}
    return dict(state) | {"state": values}


def _reshaped(value: Any, shape: torch.Size | None) -> Any:
    if isinstance(value, torch.Tensor) and shape is not None and value.numel() == 1 == shape.numel():
        return value.reshape(shape)
    return value
