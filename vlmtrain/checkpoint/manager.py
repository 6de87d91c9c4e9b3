"""Step-based checkpoints that a crash can never leave half-written.

Each checkpoint is written to a temporary file, flushed to disk and renamed into place; the
`latest` pointer is replaced the same way afterwards, so it always names a complete file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

STEP_FILE = re.compile(r"step_(\d+)\.pt$")


def _atomic_write(path: Path, write: callable) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int = 2) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step_{step:08d}.pt"
        _atomic_write(path, lambda handle: torch.save(state, handle))
        _atomic_write(self.directory / "latest", lambda handle: handle.write(path.name.encode()))
        self._prune()
        return path

    def latest(self) -> Path | None:
        pointer = self.directory / "latest"
        if pointer.exists():
            path = self.directory / pointer.read_text().strip()
            if path.exists():
                return path
        steps = self._by_step()
        return steps[-1] if steps else None

    def load(self, path: Path | None = None) -> dict[str, Any] | None:
        path = path or self.latest()
        return None if path is None else torch.load(path, map_location="cpu", weights_only=False)

    def _by_step(self) -> list[Path]:
        found = [p for p in self.directory.glob("step_*.pt") if STEP_FILE.search(p.name)]
        return sorted(found, key=lambda p: int(STEP_FILE.search(p.name).group(1)))

    def _prune(self) -> None:
        for old in self._by_step()[: -self.keep_last] if self.keep_last > 0 else []:
            old.unlink(missing_ok=True)
