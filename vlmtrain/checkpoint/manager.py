"""Step-based checkpoints of every stateful part of a run, written so that a crash never leaves a broken one.

The manager is handed the run's parts, anything with `state_dict()`/`load_state_dict()` (model,
optimizer, schedule, train state, RNG states, the data loader's position), and is the one place that
saves and restores them. It decides when a step is due (`every`), keeps the newest `keep_last`, and
writes each file under a temporary name, flushed and renamed into place; the `latest` pointer is
replaced the same way afterwards, so it always names a complete file. Files hold tensors and plain
Python values only and are read with `weights_only=True`: loading a checkpoint never runs code, and a
file that needs more is refused in one line.

Faults: a failed write (a full disk) removes its temporary file and raises CheckpointWriteError naming
the newest complete checkpoint; temporary files a killed process left behind are swept when the run
starts again; a checkpoint that cannot be read (truncated) is set aside as `*.unreadable` and the newest
one that loads is taken instead.

A resume takes the newest checkpoint of either kind (vlmtrain.checkpoint.kinds): a sharded run's step
folder (`trainer.parallel=fsdp`) is read whole in this process, its optimizer state keyed by index again.

The folder is the boundary: `latest` may only name a `step_N.pt` (or a sharded run's `step_N`) entry of
it (anything else is ignored, with a warning); only regular files are opened, never through a link, and
never blocking on a FIFO or device; a link, a special file or a file that is not a torch archive is "not
a checkpoint" and set aside like a truncated one. Nothing outside the folder is ever renamed or deleted.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch

from vlmtrain.atomic import write_atomic, write_text_atomic
from vlmtrain.checkpoint.errors import CheckpointWriteError, UnsafeCheckpoint
from vlmtrain.checkpoint.kinds import (
    SHARDED,
    STEP_FILE,
    STEP_FOLDER,
    by_index,
    is_step_folder,
    newest_first,
    optimizer_shaped,
    parameter_names,
    prune,
    shaped,
    step_files,
    sweep,
)

log = logging.getLogger("vlmtrain")
TORCH_ARCHIVE = b"PK\x03\x04"  # torch.save writes a zip file


class NotACheckpoint(ValueError):
    """A link, a FIFO or device, or a file that is not a torch archive, where a checkpoint should be."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def open_regular(path: str | Path, follow_links: bool = False) -> BinaryIO:
    """`path` opened for reading if it is a regular file, else NotACheckpoint: a FIFO or a device is
    never read (nor waited on), and a link is not followed unless `follow_links`."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NotACheckpoint(f"{path}: not a checkpoint (a link)") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotACheckpoint(f"{path}: not a checkpoint (not a regular file)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_checkpoint(path: str | Path, follow_links: bool = False) -> dict[str, Any]:
    """A checkpoint file's contents, on the CPU; tensors and plain values only, else UnsafeCheckpoint;
    NotACheckpoint for anything but a regular file holding a torch archive (see `open_regular`)."""
    with open_regular(path, follow_links) as handle:
        if handle.read(len(TORCH_ARCHIVE)) != TORCH_ARCHIVE:
            raise NotACheckpoint(f"{path}: not a checkpoint (not a file torch.save wrote)")
        handle.seek(0)
        try:
            return torch.load(handle, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if "weights only" not in str(error).lower():
                raise
            raise UnsafeCheckpoint(
                f"{path}: refused: it holds objects other than tensors and plain values, and loading them "
                "could run code"
            ) from None


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The step file `latest` names in `directory`, else the highest step file there, else None."""
    found = candidates(Path(directory))
    return found[0] if found else None


def candidates(directory: Path) -> list[Path]:
    """The entries of `directory` named like checkpoints, newest first: the one `latest` names, then
    every other by step. Entries only: what they are (a file, a link, a FIFO) is for the reader to check."""
    steps = step_files(directory)
    named = _pointer(directory)
    first = [named] if named in steps else []
    return first + [p for p in reversed(steps) if p != named]


def resume_candidates(directory: str | Path, sharded: bool = False) -> list[Path]:
    """Both kinds' checkpoints in `directory`, newest first: the one `latest` names, then every other by
    step, the run's own kind first at the same step (step folders when `sharded`)."""
    return newest_first(directory, _pointer(Path(directory)), sharded)


def _pointer(directory: Path) -> Path | None:
    """The entry `latest` names, if it names one by its expected form (`step_N.pt`, or a sharded run's
    `step_N`; nothing else)."""
    try:
        with open_regular(directory / "latest") as handle:
            name = handle.read(256).decode("ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    except (OSError, NotACheckpoint) as error:
        log.warning(
            "%s/latest is not a pointer (%s); using the newest step file", directory, _first_line(error)
        )
        return None
    if not (STEP_FILE.fullmatch(name) or STEP_FOLDER.fullmatch(name)):
        log.warning(
            "%s/latest names %r, not a checkpoint of this folder; using the newest step file",
            directory,
            name[:80],
        )
        return None
    return directory / name


def read_newest(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of either kind in `directory` that reads, and its contents (a step folder's
    weights whole; nothing is renamed: for tools that only read a run); None if there is none."""
    for path in resume_candidates(directory):
        saved = _read_or_report(path, _read_whole_folder if is_step_folder(path) else read_checkpoint)
        if saved is not None:
            return path, saved
    return None


def _read_whole_folder(folder: Path) -> dict[str, Any]:
    from vlmtrain.checkpoint.sharded_full import read_full_checkpoint  # torch.distributed, when needed

    return read_full_checkpoint(folder)


def _read_or_report(
    path: Path, read: Callable[[Path], dict[str, Any]] = read_checkpoint
) -> dict[str, Any] | None:
    """The checkpoint's contents (`read(path)`), or None (and a warning) for one that is truncated or not
    a checkpoint. A file that could run code is refused outright (UnsafeCheckpoint)."""
    try:
        return read(path)
    except UnsafeCheckpoint:
        raise
    except NotACheckpoint as error:
        log.warning("%s; trying the previous checkpoint", error)
    except Exception as error:  # truncated or corrupt: fall back to the previous checkpoint
        log.warning("%s cannot be read (%s); trying the previous checkpoint", path, _first_line(error))
    return None


class CheckpointManager:
    """Saves `parts` (plus `extra`, e.g. the resolved config) every `every` steps into `directory`.
    `writer=False` (ranks other than 0): `save` builds the state (a collective for some parts) but does
    not write it, while `resume` still loads."""

    def __init__(
        self,
        directory: str | Path,
        parts: Mapping[str, Stateful],
        every: int,
        keep_last: int = 2,
        extra: dict[str, Any] | None = None,
        writer: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.parts, self.every, self.keep_last = dict(parts), every, keep_last
        self.extra, self.writer = extra or {}, writer
        self.saved_step: int | None = None

    def due(self, step: int, last: bool = False) -> bool:
        """Whether `save(step, last)` would write (the same answer on every rank)."""
        return step != self.saved_step and (last or step % self.every == 0)

    def save(self, step: int, last: bool = False) -> Path | None:
        """Write a checkpoint if `step` is due (or `last`) and not already written; return its path."""
        if not self.due(step, last):
            return None
        # Every rank builds the state: a part may gather it across ranks (the data loader's cursors).
        state = {name: part.state_dict() for name, part in self.parts.items()} | self.extra
        path = self._write(step, state) if self.writer else None
        self.saved_step = step
        return path

    def _write(self, step: int, state: dict[str, Any]) -> Path:
        path = self.directory / f"step_{step:08d}.pt"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda handle: torch.save(state, handle))
            write_text_atomic(self.directory / "latest", path.name)
        except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
            if not _write_failure(error):  # e.g. a data worker's death, raised by torch's SIGCHLD handler
                raise
            intact = (resume_candidates(self.directory) or [None])[0]
            kept = f"{intact} is intact" if intact else "no earlier checkpoint exists"
            reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
            raise CheckpointWriteError(f"checkpoint of step {step} not written ({reason}); {kept}") from None
        self._prune()
        return path

    def resume(self, check: Callable[[Path, dict[str, Any]], None] | None = None) -> Path | None:
        """Load the newest checkpoint of either kind that reads into every part; the file (or sharded
        run's folder) read, or None for a fresh run. `check(path, saved)` sees its contents (a folder's:
        all but the weights) first and may refuse them by raising."""
        if self.writer:
            self._sweep()
        for path in resume_candidates(self.directory):
            if self._restore(path, check):
                return path
            if self.writer:  # an entry of this folder: set aside, so that it is not tried again
                path.rename(path.with_name(path.name + ".unreadable"))
        return None

    def _restore(self, path: Path, check: Callable[[Path, dict[str, Any]], None] | None) -> bool:
        """Load `path` into every part; False (and a warning) if it cannot be read."""
        folder = is_step_folder(path)
        saved = _read_or_report(path, _read_run_state if folder else read_checkpoint)
        if saved is None:
            return False
        if check is not None:
            check(path, saved)
        if folder and set(SHARDED) <= self.parts.keys():
            weights = _read_or_report(path, _read_full_weights)
            if weights is None:
                return False
            saved |= self._unsharded(path, weights)
        missing = [name for name in self.parts if name not in saved]
        if missing:
            raise ValueError(f"{path}: not a checkpoint of this run (no {', '.join(missing)})")
        for name, part in self.parts.items():
            part.load_state_dict(saved[name])
        return True

    def _unsharded(self, folder: Path, weights: dict[str, Any]) -> dict[str, Any]:
        """A sharded run's full weights and optimizer state as this model and optimizer hold them: 0-d
        parameters as scalars again, the optimizer's state keyed by index (ConfigError if it does not map)."""
        model, optimizer = self.parts["model"], self.parts["optimizer"]
        shapes = {name: param.shape for name, param in model.named_parameters()}
        state = optimizer_shaped(weights["optimizer"], shapes, folder)
        return {
            "model": shaped(weights["model"], {k: v.shape for k, v in model.state_dict().items()}),
            "optimizer": by_index(state, parameter_names(model, optimizer), folder),
        }

    def close(self) -> None:
        """Nothing to wait for: every save is written before it returns."""

    def _sweep(self) -> None:
        """Remove the temporary files (and folders, a sharded run's) of writes a killed process never
        finished."""
        stale = sweep(self.directory)
        if stale:
            log.info("removed %d unfinished checkpoint file(s) from %s", len(stale), self.directory)

    def _prune(self) -> None:
        prune(self.directory, self.keep_last)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _read_run_state(folder: Path) -> dict[str, Any]:
    """A sharded run's step folder, all but its weights (its metadata checked first, UnsafeCheckpoint)."""
    from vlmtrain.checkpoint.sharded_full import read_run_state  # torch.distributed: only when needed

    return read_run_state(folder)


def _read_full_weights(folder: Path) -> dict[str, Any]:
    from vlmtrain.checkpoint.sharded_full import read_full_weights

    return read_full_weights(folder)


# what torch's zip writer says when a write fails (its other RuntimeErrors are not about the file)
_WRITER_WORDS = ("PytorchStreamWriter", "inline_container", "unexpected pos")


def _write_failure(error: BaseException) -> bool:
    """Whether `error`, raised while a checkpoint was written, is that write failing."""
    return isinstance(error, OSError) or any(word in str(error) for word in _WRITER_WORDS)
