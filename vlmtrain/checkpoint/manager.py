"""Step-based checkpoints of every stateful part of a run, written so that a crash never leaves a broken one.

The manager is handed the run's parts, anything with `state_dict()`/`load_state_dict()` (model,
optimizer, schedule, train state, RNG states, the data loader's position), and is the one place that
saves and restores them. It decides when a step is due (`every`), keeps the newest `keep_last`, and
writes each file under a temporary name, flushed and renamed into place; the `latest` pointer is
replaced the same way afterwards, so it always names a complete file. Files hold tensors and plain
Python values only and are read with `weights_only=True`: loading a checkpoint never runs code.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch

log = logging.getLogger("vlmtrain")
STEP_FILE = re.compile(r"step_(\d+)\.pt$")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file's contents, on the CPU; tensors and plain values only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The file `latest` names in `directory`, else the highest step file there, else None."""
    directory = Path(directory)
    pointer = directory / "latest"
    if pointer.is_file():
        named = directory / pointer.read_text().strip()
        if named.is_file():
            return named
    steps = _by_step(directory)
    return steps[-1] if steps else None


class CheckpointManager:
    """Saves `parts` (plus `extra`, e.g. the resolved config) every `every` steps into `directory`.
    `writer=False` (ranks other than 0) makes `save` a no-op while `resume` still loads."""

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
        path = self._write(step) if self.writer else None
        self.saved_step = step
        return path

    def _write(self, step: int) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step_{step:08d}.pt"
        state = {name: part.state_dict() for name, part in self.parts.items()} | self.extra
        _atomic_write(path, lambda handle: torch.save(state, handle))
        _atomic_write(self.directory / "latest", lambda handle: handle.write(path.name.encode()))
        self._prune()
        return path

    def resume(self) -> Path | None:
        """Load the latest checkpoint into every part; the file read, or None for a fresh run."""
        path = latest_checkpoint(self.directory)
        if path is None:
            return None
        saved = read_checkpoint(path)
        missing = [name for name in self.parts if name not in saved]
        if missing:
            raise ValueError(f"{path}: not a checkpoint of this run (no {', '.join(missing)})")
        for name, part in self.parts.items():
            part.load_state_dict(saved[name])
        return path

    def _prune(self) -> None:
        for old in _by_step(self.directory)[: -self.keep_last] if self.keep_last > 0 else []:
            old.unlink(missing_ok=True)


def _by_step(directory: Path) -> list[Path]:
    found = [p for p in directory.glob("step_*.pt") if STEP_FILE.search(p.name)]
    return sorted(found, key=lambda p: int(STEP_FILE.search(p.name).group(1)))


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
