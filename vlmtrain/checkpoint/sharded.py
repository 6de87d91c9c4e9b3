"""Sharded checkpoints: every rank writes its own shards of the model and optimizer (torch.distributed
.checkpoint), and any number of ranks reads them back, each taking the pieces its own sharding needs.

A step is a folder, `step_N/` (N in 8 digits, like the unsharded `step_N.pt`), written under a temporary
name (`.step_N.tmp`) and renamed into place by rank 0 only after every rank has finished writing (a
barrier): the folder appears whole or not at all, and a killed write leaves only a temporary folder for
`kinds.sweep` to remove. Then `latest` is replaced to name it and the oldest beyond `keep_last` go.
Beside the shards, rank 0 may write one ordinary checkpoint file (`run_state.pt`: a run's schedule,
counters, random states, data position and config), read as unsharded checkpoints are, with no process
group. `save_sharded_async` writes the same folder from a background thread once the state is copied to
host memory, so that training goes on during the write; the folder still appears only once whole.

Loading never runs code. The format's `.metadata` file is a pickle: it is read with an unpickler that
builds only the checkpoint format's own metadata classes, torch sizes, dtypes and layouts, paths and plain
builtins, and anything else is refused in one line (UnsafeCheckpoint) before a byte of the payload runs.
The same unpickler is the one the load itself uses, and the non-tensor values (optimizer settings, step
counters) are read with `weights_only=True`, where the format's default would unpickle them freely.

The run's config (`extra["config"]`, as a `.pt` checkpoint holds it) is stored whole as JSON text: the
format would flatten a dict into one value per leaf and drop its empty parts. It is read back as plain
values (JSON), like the rest.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from vlmtrain.atomic import write_atomic, write_text_atomic
from vlmtrain.checkpoint.errors import UnsafeCheckpoint
from vlmtrain.checkpoint.kinds import METADATA, prune

RUN_STATE = "run_state.pt"  # rank 0's plain values beside the shards (`beside`)
LATEST = "latest"
CONFIG = "config"  # the extra value stored whole as JSON text
_SAFE_MODULES = {  # module: names the metadata pickle may build
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "StorageMeta",
        "MetadataIndex",
        "ChunkStorageMetadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by its name
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "list", "dict", "tuple", "int", "float", "str", "bytes", "bool"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _SAFE_MODULES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_metadata(path: str | Path) -> Metadata:
    """A sharded checkpoint's metadata file, built from the format's own classes only, else
    UnsafeCheckpoint (nothing in the file has run)."""
    with open(path, "rb") as handle:
        try:
            metadata = _MetadataUnpickler(handle).load()
        except pickle.UnpicklingError as error:
            raise UnsafeCheckpoint(
                f"{path}: refused: its metadata would build {error}, not only checkpoint metadata, and "
                "loading it could run code"
            ) from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"{path}: refused: not a sharded checkpoint's metadata")
    return metadata


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        metadata = read_metadata(Path(self.path) / (METADATA if rank is None else f"__{rank}{METADATA}"))
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor values read as tensors and plain values only (the default planner allows any object)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise UnsafeCheckpoint(f"{read_item.dest_index.fqn}: refused: not a plain value") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> dict[str, Any]:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state, **extra}


def save_sharded(
    directory: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any] | None = None,
    beside: dict[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write `step_N/` in `directory` from every rank (a collective); return it once it is visible to all
    and `latest` names it. `extra`: plain values saved beside (a train state); "model" and "optimizer" are
    taken. `beside`: rank 0's plain values, written as one ordinary checkpoint file in the folder
    (`RUN_STATE`, read like an unsharded checkpoint, without a process group). `keep_last`: step folders
    kept (0: all)."""
    final, partial = _begin(Path(directory), step, beside)
    stored = {k: json.dumps(v) if k == CONFIG else v for k, v in (extra or {}).items()}
    dcp.save(_state(model, optimizer, stored), storage_writer=FileSystemWriter(partial))
    _barrier()  # every rank's shards are on disk
    _raise_agreed(_on_rank_0(lambda: _publish(partial, final, keep_last)))
    return final


class PendingSave:
    """A step folder being written in the background: `wait()` returns it once it is in place (rank 0
    moves it there as soon as every rank's shards and the metadata are written), or raises the write's
    error."""

    def __init__(self, written: Future, final: Path, publish: Callable[[], None] | None) -> None:
        self.final, self._publish, self._done = final, publish, Future()
        written.add_done_callback(self._finish)

    def _finish(self, written: Future) -> None:  # in the writing thread, once the write has ended
        try:
            written.result()
            if self._publish is not None:
                self._publish()
            self._done.set_result(self.final)
        except BaseException as error:
            self._done.set_exception(error)

    def done(self) -> bool:
        return self._done.done()

    def wait(self) -> Path:
        return self._done.result()


def save_sharded_async(
    directory: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    process_group: dist.ProcessGroup | None,
    beside: dict[str, Any] | None = None,
    keep_last: int = 2,
) -> PendingSave:
    """`save_sharded` in the background (a collective): the state is copied to host memory now, then a
    thread writes it while training goes on. `process_group`: a gloo group for the writing thread's own
    collectives, apart from the training's (None without a process group). Wait for one save before the
    next starts, and before the process ends."""
    final, partial = _begin(Path(directory), step, beside)
    writer = FileSystemWriter(partial)
    response = dcp.async_save(
        _state(model, optimizer, {}), storage_writer=writer, process_group=process_group
    )
    written = getattr(response, "upload_completion", response)  # a Future, or one inside a response
    publish = (lambda: _publish(partial, final, keep_last)) if _rank() == 0 else None
    return PendingSave(written, final, publish)


def _begin(directory: Path, step: int, beside: dict[str, Any] | None) -> tuple[Path, Path]:
    """The step's final and temporary folders; rank 0 clears the temporary one (an earlier write of this
    step that was killed) and writes `beside` into it. A collective."""
    final, partial = directory / f"step_{step:08d}", directory / f".step_{step:08d}.tmp"

    def prepare() -> None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        if beside is not None:
            write_atomic(partial / RUN_STATE, lambda handle: torch.save(beside, handle))

    _raise_agreed(_on_rank_0(prepare))
    return final, partial


def _on_rank_0(work: Callable[[], None]) -> OSError | None:
    """Run `work` on rank 0; the OSError it raised (a full disk), else None."""
    try:
        if _rank() == 0:
            work()
    except OSError as error:
        return error
    return None


def _raise_agreed(error: OSError | None) -> None:
    """Rank 0's error raised on every rank, in place of a barrier (a collective): no rank goes on to
    write, or past a save, while another stops."""
    box = [error]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]


def _publish(partial: Path, final: Path, keep_last: int) -> None:
    """Rank 0, once every rank's shards are written: the folder into place, `latest` to it, old ones out."""
    _move_into_place(partial, final)
    write_text_atomic(final.parent / LATEST, final.name)
    prune(final.parent, keep_last)


def _move_into_place(partial: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old")
    if final.exists():  # the same step saved again: the new folder replaces it
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)


def load_sharded(
    folder: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a step folder into `model` and `optimizer`, resharded to however they are sharded now (a
    collective when a process group exists); return `extra`'s keys as saved. UnsafeCheckpoint if the
    folder's metadata or values are more than data (refused on every rank before anything is read)."""
    folder = Path(folder)
    read_metadata(folder / METADATA)
    state = _state(model, optimizer, {k: "" if k == CONFIG else v for k, v in (extra or {}).items()})
    try:
        dcp.load(state, storage_reader=_SafeReader(folder), planner=_SafeLoadPlanner())
    except CheckpointException as error:  # one rank's refusal, reported by every rank in one line
        refusals = [exc for exc, _ in error.failures.values() if isinstance(exc, UnsafeCheckpoint)]
        if refusals:
            raise UnsafeCheckpoint(f"{folder}: {refusals[0]}") from None
        raise
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return {
        k: decoded(folder, v) if k == CONFIG else v
        for k, v in state.items()
        if k not in ("model", "optimizer")
    }


def decoded(folder: Path, config: Any) -> Any:
    """The run config as saved (JSON text -> plain values), else UnsafeCheckpoint naming the folder."""
    try:
        return json.loads(config)
    except (TypeError, ValueError):
        raise UnsafeCheckpoint(f"{folder}: {CONFIG}: refused: not a run config saved as JSON") from None
