"""A debugging record of which samples each step trained on: run_dir/keys/rank{R}.jsonl, one line per step
({"step": s, "keys": [...]}). A resumed run first drops the lines after its checkpoint's step (it trains
those steps again), so the file always tells what the weights have seen."""

from __future__ import annotations

import json
from pathlib import Path

from vlmtrain.train.metrics import drop_lines_after


class KeyLog:
    def __init__(self, run_dir: Path, rank: int, enabled: bool) -> None:
        self.enabled, self.path = enabled, run_dir / "keys" / f"rank{rank}.jsonl"
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def drop_after(self, step: int) -> None:
        if self.enabled:
            drop_lines_after(self.path, step)

    def write(self, step: int, keys: list[str]) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": step, "keys": keys}) + "\n")
