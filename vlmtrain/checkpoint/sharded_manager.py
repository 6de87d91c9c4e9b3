"""Checkpoints of a sharded run (`trainer.parallel=fsdp`), with the CheckpointManager's interface.

Every `every` steps each rank writes its shards of the model and optimizer into `step_N/`
(vlmtrain.checkpoint.sharded), and rank 0 writes the run's other parts (schedule, counters, random states,
data position) and `extra` (the config) beside them as `run_state.pt`; the folder appears, `latest` moves
and the oldest beyond `keep_last` go only once every rank has finished. `asynchronous`: the write runs in
the background while the next steps train; a save first waits for the one before it, the last save of a
run waits for its own, and so does `close`.

Resume takes the newest complete checkpoint that reads (rank 0 first sweeps the temporary folders of
killed writes), of either kind (vlmtrain.checkpoint.kinds): a ddp run's `step_N.pt` is read by rank 0
alone, which hands every rank the run state and, by broadcast, its shards of the full weights and
optimizer state (keyed by name again): the file is in memory once, not once per rank. One
whose run state or shards cannot be read (truncated) is set aside as `*.unreadable` and the previous one
tried, the same on every rank; one whose metadata or values are more than data is refused in one line
(UnsafeCheckpoint), never run. Failures are agreed, so every rank raises the same error at the same save.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

from vlmtrain.checkpoint.errors import CheckpointWriteError, UnsafeCheckpoint
from vlmtrain.checkpoint.kinds import (
    SHARDED,
    by_name,
    is_step_folder,
    optimizer_shaped,
    parameter_names,
    sweep,
)
from vlmtrain.checkpoint.manager import NotACheckpoint, Stateful, read_checkpoint, resume_candidates
from vlmtrain.checkpoint.sharded import (
    METADATA,
    RUN_STATE,
    PendingSave,
    load_sharded,
    read_metadata,
    save_sharded,
    save_sharded_async,
)
from vlmtrain.distributed.sharding import load_full_state_dict
from vlmtrain.schema import ConfigError

log = logging.getLogger("vlmtrain")


class ShardedCheckpointManager:
    """Saves `parts` (with "model" and "optimizer", sharded) plus `extra` every `every` steps into
    `directory`. `writer` (rank 0): writes the run state, moves folders into place and sweeps leftovers;
    every rank writes its shards."""

    def __init__(
        self,
        directory: str | Path,
        parts: Mapping[str, Stateful],
        every: int,
        keep_last: int = 2,
        extra: dict[str, Any] | None = None,
        writer: bool = True,
        *,
        asynchronous: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.model, self.optimizer = parts["model"], parts["optimizer"]
        self.parts = {name: part for name, part in parts.items() if name not in SHARDED}
        self.every, self.keep_last, self.extra, self.writer = every, keep_last, extra or {}, writer
        self.saved_step: int | None = None
        self.pending: PendingSave | None = None
        self.pending_step = 0
        # the background writer's collectives run beside the training's: a gloo group of their own
        self.group = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None
        self.asynchronous = asynchronous

    def due(self, step: int, last: bool = False) -> bool:
        """Whether `save(step, last)` would write (the same answer on every rank)."""
        return step != self.saved_step and (last or step % self.every == 0)

    def save(self, step: int, last: bool = False) -> Path | None:
        """Write `step_N/` if due (a collective); return it (asynchronous: the folder it will be, unless
        `last`, which waits). CheckpointWriteError, on every rank, if this or the previous write failed."""
        if not self.due(step, last):
            return None
        _raise_agreed(self._finish_pending())
        # every rank builds the state: the data loader's gathers every rank's cursors
        state = {name: part.state_dict() for name, part in self.parts.items()} | self.extra
        path, failed = None, None
        try:
            path = self._write(step, state if self.writer else None, last)
        except (OSError, CheckpointException) as error:
            failed = self._failure(step, error)
        _raise_agreed(failed)
        self.saved_step = step
        return path

    def _write(self, step: int, beside: dict[str, Any] | None, last: bool) -> Path:
        options = dict(model=self.model, optimizer=self.optimizer, beside=beside, keep_last=self.keep_last)
        if not self.asynchronous:
            return save_sharded(self.directory, step, **options)
        self.pending = save_sharded_async(self.directory, step, process_group=self.group, **options)
        self.pending_step = step
        if last:
            self.pending, pending = None, self.pending
            return pending.wait()
        return self.pending.final

    def _finish_pending(self) -> str | None:
        """Wait for the background write, if any; its failure as one line, else None."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        try:
            pending.wait()
        except (OSError, CheckpointException) as error:
            return self._failure(self.pending_step, error)
        return None

    def _failure(self, step: int, error: BaseException) -> str:
        """The failed write's one line; its temporary folder removed (every rank has left the write)."""
        if self.writer:
            shutil.rmtree(self.directory / f".step_{step:08d}.tmp", ignore_errors=True)
        intact = (resume_candidates(self.directory, sharded=True) or [None])[0]
        kept = f"{intact} is intact" if intact else "no earlier checkpoint exists"
        return f"checkpoint of step {step} not written ({_reason(error)}); {kept}"

    def close(self) -> None:
        """Wait for a write still in the background (its failure is logged: the run is over)."""
        if (failed := self._finish_pending()) is not None:
            log.error(failed)

    def resume(self, check: Callable[[Path, dict[str, Any]], None] | None = None) -> Path | None:
        """Load the newest checkpoint of either kind that reads into every part (a collective); the step
        folder (or a ddp run's step file), or None for a new run. `check(path, run_state)` sees the saved
        run state first and may refuse it."""
        if self.writer:
            sweep(self.directory)
        _raise_agreed(None)  # the sweep is done before any rank lists the checkpoints
        for path in resume_candidates(self.directory, sharded=True):
            if self._load(path, check) if is_step_folder(path) else self._load_file(path, check):
                return path
            if self.writer:  # set aside, so that it is not tried again
                path.rename(path.with_name(path.name + ".unreadable"))
        return None

    def _load(self, folder: Path, check: Callable[[Path, dict[str, Any]], None] | None) -> bool:
        """Restore every part from `folder`; False (the same on every rank) if it cannot be read."""
        read_metadata(folder / METADATA)  # a crafted one is refused before anything else is read
        saved = self._read_agreed(folder / RUN_STATE)
        if saved is None:
            return False
        self._check(folder, saved, check, self.parts)
        try:
            load_sharded(folder, model=self.model, optimizer=self.optimizer)
        except CheckpointException as error:  # raised on every rank: a shard that cannot be read
            log.warning("%s cannot be read (%s); trying the previous checkpoint", folder, _reason(error))
            return False
        for name, part in self.parts.items():
            part.load_state_dict(saved[name])
        return True

    def _load_file(self, path: Path, check: Callable[[Path, dict[str, Any]], None] | None) -> bool:
        """Restore every part from a ddp run's step file. Rank 0 alone reads it (a large model's file is
        in memory once, not once per rank); every rank gets the rest of the run state from it, and its
        shards of the weights and optimizer state by broadcast. False (on every rank) if it cannot be
        read."""
        grouped = dist.is_initialized()  # else one process: no broadcast
        first = not grouped or dist.get_rank() == 0
        saved = self._read_agreed(path, here=first)
        if saved is None:
            return False
        run_state = _from_first({name: None if name in SHARDED else value for name, value in saved.items()})
        self._check(path, run_state, check, [*SHARDED, *self.parts])
        optimizer = self._optimizer_by_name(path, saved, first)
        load_full_state_dict(self.model, saved["model"] if first else {}, from_first=grouped)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=grouped)
        set_optimizer_state_dict(self.model, self.optimizer, optimizer, options=options)
        for name, part in self.parts.items():
            part.load_state_dict(run_state[name])
        return True

    def _optimizer_by_name(self, path: Path, saved: dict[str, Any], first: bool) -> dict[str, Any]:
        """The file's optimizer state keyed by parameter name, shaped as the sharded model holds its
        parameters (on rank 0, which read it; {} elsewhere); a state that does not map is refused on every
        rank (a collective)."""
        state, refusal = {}, None
        if first:
            groups = parameter_names(self.model, self.optimizer)
            shapes = {name: param.shape for name, param in self.model.named_parameters()}
            try:
                state = optimizer_shaped(by_name(saved["optimizer"], groups, path), shapes, path)
            except ConfigError as error:
                refusal = str(error)
        if (refusal := _from_first(refusal)) is not None:
            raise ConfigError(refusal)
        return state

    def _read_agreed(self, path: Path, here: bool = True) -> dict[str, Any] | None:
        """A checkpoint file's contents where `here` ({} elsewhere); None on every rank (and a warning)
        if it cannot be read where it is read."""
        saved, unsafe, failed = {}, None, None
        try:
            saved = read_checkpoint(path) if here else {}
        except UnsafeCheckpoint as error:
            unsafe = str(error)
        except NotACheckpoint as error:
            failed = str(error)
        except Exception as error:  # truncated or missing: the previous checkpoint
            failed = f"{path} cannot be read ({_reason(error)})"
        if (unsafe := _agreed(unsafe)) is not None:  # refused on every rank, never run
            raise UnsafeCheckpoint(unsafe)
        if (failed := _agreed(failed)) is not None:
            log.warning("%s; trying the previous checkpoint", failed)
            return None
        return saved

    @staticmethod
    def _check(path: Path, saved: dict[str, Any], check: Callable | None, parts: Iterable[str]) -> None:
        if check is not None:
            check(path, saved)
        missing = [name for name in parts if name not in saved]
        if missing:
            raise ValueError(f"{path}: not a checkpoint of this run (no {', '.join(missing)})")


def _reason(error: BaseException) -> str:
    """A write or read failure in a few words: the first failing rank's, for a checkpoint collective's."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    reason = getattr(error, "strerror", None) or str(error).strip() or type(error).__name__
    return reason.splitlines()[0]


def _agreed(message: str | None) -> str | None:
    """The lowest failing rank's message, on every rank (a collective); None when none failed."""
    if not dist.is_initialized():
        return message
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m is not None), None)


def _from_first(value: Any) -> Any:
    """Rank 0's `value`, on every rank (a collective)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _raise_agreed(message: str | None) -> None:
    if (message := _agreed(message)) is not None:
        raise CheckpointWriteError(message)
