"""What a person watching a run sees: a live bar on an interactive terminal, plain log lines otherwise
(CI, SLURM logs, a file), so that the same run reads well in both."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import IO, Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vlmtrain.train.metrics import progress_line

log = logging.getLogger("vlmtrain")


class Progress:
    """`advance()` every step moves the bar; `report()` every `log_every` steps writes a log line and
    updates the bar's figures. With a bar, that line goes to log files only (the run's log), not to
    the console; other log records print above the bar."""

    def __init__(
        self, start: int, total: int, enabled: bool = True, bar: bool | None = None, stream: IO | None = None
    ) -> None:
        self.total, self.enabled = total, enabled
        stream = stream or sys.stderr
        self.bar: tqdm | None = None
        self._redirect: contextlib.ExitStack | None = None
        if enabled and (stream.isatty() if bar is None else bar):
            self.bar = tqdm(
                total=total, initial=start, file=stream, unit="step", dynamic_ncols=True, mininterval=0.5
            )
            self._redirect = contextlib.ExitStack()
            self._redirect.enter_context(logging_redirect_tqdm())
            for handler in logging.getLogger().handlers:  # the bar says it on the console; files keep it
                if not isinstance(handler, logging.FileHandler):
                    handler.addFilter(_not_progress)
                    self._redirect.callback(handler.removeFilter, _not_progress)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def report(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        log.info(progress_line(step, self.total, metrics), extra={"progress": True})
        if self.bar is not None:
            self.bar.set_postfix_str(bar_figures(metrics), refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None


def bar_figures(metrics: dict[str, Any]) -> str:
    """loss, samples/s and data wait; step/max, rate and ETA are the bar's own."""
    return (
        f"loss {metrics['loss']:.4f} {metrics.get('samples_per_s', 0):.0f} samples/s "
        f"data {metrics.get('data_wait', 0):.0%}"
    )


def _not_progress(record: logging.LogRecord) -> bool:
    return not getattr(record, "progress", False)
