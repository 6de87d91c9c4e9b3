"""Garbage collection at step boundaries, at the same steps on every rank.

Python's collector runs whenever allocations pass a threshold: in the middle of any step, on each rank
at its own moment, and a full collection over the hundreds of thousands of objects a run holds (torch,
the model, the config) pauses it for a quarter of a second on a CPU. Under DDP a pause on one rank stalls
every rank. So while the run trains, what exists once it is built is frozen (never scanned again), the
automatic collector is off, and every `trainer.gc_every` steps one collection, cheap now, runs on every
rank. Data workers collect on their own (`worker_collects`).
"""

from __future__ import annotations

import gc
from types import TracebackType


class StepCollector:
    """A context for the training loop; `step(n)` after each step. `every=0`: Python's own collection."""

    def __init__(self, every: int) -> None:
        self.every = every

    def __enter__(self) -> StepCollector:
        if self.every:
            gc.collect()
            gc.freeze()  # the model, the optimizer, torch and the rest stay: no need to scan them again
            gc.disable()
        return self

    def step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            gc.collect()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.every:
            gc.unfreeze()
            gc.enable()
