"""A debugging record of which samples each step trained on: run_dir/keys/rank{R}.jsonl, one line per step
({"step": s, "keys": [...]}). A resumed run first drops the lines after its checkpoint's step (it trains
those steps again), so the file always tells what the weights have seen."""

from __future__ import annotations

import json
import os
from pathlib import Path


class KeyLog:
    def __init__(self, run_dir: Path, rank: int, enabled: bool) -> None:
        self.enabled, self.path = enabled, run_dir / "keys" / f"rank{rank}.jsonl"
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def drop_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines(keepends=True) if _kept(line, step)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def write(self, step: int, keys: list[str]) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": step, "keys": keys}) + "\n")


def _kept(line: str, step: int) -> bool:
    """A complete line of a step up to `step` (a killed process may leave the last one half-written)."""
    try:
        return int(json.loads(line)["step"]) <= step and line.endswith("\n")
    except (ValueError, KeyError, TypeError):
        return False
