"""A run's state in one small file, `status.json` in its run directory, replaced atomically so a reader
(`vlmtrain-runs`) never sees half of it: running, finished, stopped (a signal; the same command resumes)
or failed (with the error's line). The host and process id let a reader tell a run that is still going
from one whose process died without a word."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from vlmtrain.atomic import write_text_atomic

STATUS_FILE = "status.json"
STATES = ("running", "finished", "stopped", "failed")


class RunStatus:
    def __init__(self, run_dir: Path, max_steps: int, enabled: bool = True) -> None:
        self.path, self.max_steps, self.enabled = Path(run_dir) / STATUS_FILE, max_steps, enabled
        self.started = time.time()

    def write(self, state: str, step: int, error: str | None = None) -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {
            "state": state,
            "step": step,
            "max_steps": self.max_steps,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "updated": time.time(),
        }
        if error:
            record["error"] = error
        write_text_atomic(self.path, json.dumps(record, indent=1))


def read_status(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def error_line(error: BaseException) -> str:
    """The exception as one line: its type and the first line of its message."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
