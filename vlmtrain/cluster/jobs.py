"""A submitted run's SLURM jobs as the runs table shows them: read from the run directory and `scontrol`,
without the launcher (torch, submitit) that submitted them."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

JOBS_FILE = "slurm_jobs.jsonl"  # one line per submission: job id, log folder


def job_columns(run_dir: Path) -> dict[str, Any]:
    """A submitted run's latest job: its id, SLURM state and restarts (empty for a run never submitted;
    state 'unknown' once SLURM has forgotten the job)."""
    jobs_file = Path(run_dir) / JOBS_FILE
    if not jobs_file.is_file():
        return {}
    job = json.loads(jobs_file.read_text().splitlines()[-1])["job_id"]
    try:
        shown = subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30
        )
        info = dict(re.findall(r"(\w+)=(\S*)", shown.stdout)) if shown.returncode == 0 else {}
    except (FileNotFoundError, subprocess.TimeoutExpired):
        info = {}
    return {
        "job": job,
        "slurm_state": info.get("JobState", "unknown"),
        "restarts": int(info.get("Restarts", 0)),
    }
