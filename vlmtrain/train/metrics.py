"""Metrics: a human line on the console, a JSON line in metrics.jsonl, and wandb (offline unless a key is set)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from vlmtrain.atomic import write_text_atomic

log = logging.getLogger("vlmtrain")


def wandb_mode() -> str:
    """Online only when the user has a key; offline otherwise, so a run never needs the network."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class MetricLogger:
    def __init__(self, run_dir: Path, enabled: bool, use_wandb: bool, config: dict, project: str) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if enabled and use_wandb:
            import wandb

            self.wandb = wandb.init(
                project=project,
                dir=str(run_dir),
                config=config,
                mode=wandb_mode(),
                name=run_dir.name,
                id=run_dir.name.replace("/", "_"),
                resume="allow",
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def drop_after(self, step: int) -> None:
        """Forget the lines of steps after `step` (a resumed run logs them again): no duplicate steps."""
        if self.enabled:
            drop_lines_after(self.path, step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def drop_lines_after(path: Path, step: int) -> None:
    """Keep only the complete lines of `path` (JSONL with a "step") for steps up to `step`, atomically."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if (s := _step_of(line)) is not None and s <= step]
    if len(kept) < len(lines):
        write_text_atomic(path, "".join(kept))


def _step_of(line: str) -> int | None:
    """A line's step; None for a line a killed process left half-written."""
    if not line.endswith("\n"):
        return None
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class Throughput:
    """Samples/s, the share of time spent waiting for data, and ETA over the window since the last report."""

    def __init__(self, start_step: int, max_steps: int) -> None:
        self.max_steps, self.last_step, self.last_time = max_steps, start_step, time.perf_counter()
        self.samples, self.data_seconds = 0, 0.0

    def add(self, samples: int, data_seconds: float = 0.0) -> None:
        self.samples += samples
        self.data_seconds += data_seconds

    def report(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.last_time, 1e-9)
        steps_per_s = (step - self.last_step) / elapsed
        out = {
            "samples_per_s": self.samples / elapsed,
            "steps_per_s": steps_per_s,
            "data_wait": self.data_seconds / elapsed,
            "eta_s": (self.max_steps - step) / max(steps_per_s, 1e-9),
        }
        self.last_step, self.last_time, self.samples, self.data_seconds = step, now, 0, 0.0
        return out


def progress_line(step: int, max_steps: int, metrics: dict[str, float]) -> str:
    eta = int(metrics.get("eta_s", 0))
    skipped = f" skipped {metrics['skipped_steps']}" if metrics.get("skipped_steps") else ""
    return (
        f"step {step}/{max_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e}{skipped} "
        f"{metrics['samples_per_s']:.0f} samples/s data {metrics.get('data_wait', 0):.0%} eta {eta // 3600}h{eta % 3600 // 60:02d}m{eta % 60:02d}s"
    )
