"""A sharded step folder read whole by one process, without a process group: the model's weights as full
tensors (every rank's shards put together) and the run's plain values, shaped as a `.pt` checkpoint holds
them, for `vlmtrain-export`, `vlmtrain-eval` and `load_pretrained`; and for a run resuming under
`trainer.parallel=ddp`, the optimizer's full state too (keyed by parameter name, as saved).

Only the model and the values asked for are read (the optimizer state only when asked). The metadata is
read by the same refusing unpickler as a resume, and the values by the same plain-value planner: a crafted
folder is refused in one line (UnsafeCheckpoint) and loading it runs no code.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from vlmtrain.checkpoint.errors import UnsafeCheckpoint
from vlmtrain.checkpoint.manager import read_checkpoint
from vlmtrain.checkpoint.sharded import (
    CONFIG,
    METADATA,
    RUN_STATE,
    _SafeLoadPlanner,
    _SafeReader,
    decoded,
    read_metadata,
)

MODEL, OPTIMIZER = "model", "optimizer"


def read_full_checkpoint(
    folder: str | Path, values: Sequence[str] = (CONFIG, "train_state"), optimizer: bool = False
) -> dict[str, Any]:
    """{"model": {name: full tensor}, and each of `values` that was saved}: the whole model on the CPU,
    in the dtypes it was saved in, and plain values only, else UnsafeCheckpoint. `optimizer`: also
    "optimizer", its whole state ({"state": {name: ...}, "param_groups": [...]})."""
    folder = Path(folder)
    metadata = read_metadata(folder / METADATA)
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    flat: dict[str, Any] = {}
    for fqn, item in metadata.state_dict_metadata.items():
        top = paths.get(fqn, (fqn,))[0]
        state = optimizer and top == OPTIMIZER
        if (top == MODEL or state) and isinstance(item, TensorStorageMetadata):
            flat[fqn] = torch.empty(item.size, dtype=item.properties.dtype)
        elif (top in values or state) and isinstance(item, BytesStorageMetadata):
            flat[fqn] = None
    try:
        with warnings.catch_warnings():  # the format warns that it loads in one process, as asked
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(flat, storage_reader=_SafeReader(folder), planner=_SafeLoadPlanner(), no_dist=True)
    except CheckpointException as error:
        refusals = [exc for exc, _ in error.failures.values() if isinstance(exc, UnsafeCheckpoint)]
        if refusals:
            raise UnsafeCheckpoint(f"{folder}: {refusals[0]}") from None
        raise
    return _nested(folder, flat, paths) | _run_state(folder, values)


def read_run_state(folder: str | Path) -> dict[str, Any]:
    """Every part a training run writes beside its shards (`RUN_STATE`: all but the weights), once the
    folder's metadata is known to be only metadata (else UnsafeCheckpoint); read as any checkpoint file
    is, tensors and plain values only."""
    read_metadata(Path(folder) / METADATA)
    return read_checkpoint(Path(folder) / RUN_STATE)


def read_full_weights(folder: str | Path) -> dict[str, Any]:
    """{"model": full weights, "optimizer": full state keyed by parameter name}: what a run resuming
    unsharded loads from a sharded run's step folder."""
    return read_full_checkpoint(folder, values=(), optimizer=True)


def _run_state(folder: Path, values: Sequence[str]) -> dict[str, Any]:
    """`values` from the run state a training run writes beside its shards (`RUN_STATE`), if there is
    one: read as any checkpoint file is, tensors and plain values only."""
    if not values or not (folder / RUN_STATE).exists():
        return {}
    saved = read_checkpoint(folder / RUN_STATE)
    return {key: saved[key] for key in values if key in saved}


def _nested(folder: Path, flat: dict[str, Any], paths: dict[str, tuple]) -> dict[str, Any]:
    """The flat values under the keys they were saved under: model weights by their state-dict names,
    the optimizer's parameter groups as a list."""
    state: dict[str, Any] = {MODEL: {}}
    for fqn, value in flat.items():
        set_element(state, paths.get(fqn, (fqn,)), value)
    if CONFIG in state:
        state[CONFIG] = decoded(folder, state[CONFIG])
    return state
