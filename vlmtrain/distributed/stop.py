"""Stopping a run without losing it: a signal sets a flag, the training loop sees it at the next step
boundary, saves a checkpoint and exits, and the same command resumes at the exact batch.

SIGTERM is what `kill`, torchrun and SLURM (on preemption, and at the time limit) send; SIGUSR1/SIGUSR2
are what `sbatch --signal=...@seconds` sends ahead of the limit; SIGINT is Ctrl-C. Repeated signals are
caught too until the checkpoint is written (at a time limit SLURM sends SIGTERM twice, milliseconds
apart); only a second Ctrl-C stops at once (KeyboardInterrupt), for an impatient user. While the loop
waits for data (`interrupting()`), a signal ends the wait at once (WaitInterrupted): a stalled read
cannot hold a stop. Data workers
ignore these signals (a signal to the whole process group would otherwise kill them mid-batch) and end
with the main process. Under DDP the ranks agree on the stop inside the training step: its one
all-reduce carries each rank's `signum` with the non-finite flag (train/step.py), so all stop after the
same step.

A submitted job's tasks catch the stop signals from their first line (`catch_early`, before anything slow
is imported): a signal that arrives before the Trainer's `StopRequest` exists is kept, and the
`StopRequest` starts with it, so the run stops at its first step boundary as if the signal had come then.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
_early = {"signum": 0}  # the first stop signal `catch_early`'s handler caught, until a StopRequest takes it


class RunStopped(Exception):
    """The run saved a checkpoint and stopped because of `signum`."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by this signal


class WaitInterrupted(BaseException):
    """A stop signal came while the loop waited (a BaseException: no `except Exception` of the data
    reader swallows it on its way out)."""


class StopRequest:
    """Catches the stop signals until `restore()`; `signum` is the first one caught here (0: none)."""

    def __init__(self) -> None:
        self.signum, _early["signum"] = _early["signum"], 0  # one caught before this handler existed
        self._waiting = False
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt
        self.signum = self.signum or signum  # the first signal names the stop
        if self._waiting:
            self._waiting = False
            raise WaitInterrupted

    @contextmanager
    def interrupting(self) -> Iterator[None]:
        """A block (a wait for data) that a stop signal ends at once with WaitInterrupted, as does one
        caught before it starts."""
        if self.signum:
            raise WaitInterrupted
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def catch_early() -> None:
    """Keep the first stop signal from now until a StopRequest takes it over (a job's startup)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _keep_early)


def _keep_early(signum: int, _frame: FrameType | None) -> None:
    _early["signum"] = _early["signum"] or signum


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """For data-loader workers (`worker_init_fn`): leave stopping to the main process."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
