"""A submitted run's SLURM jobs as the runs table shows them: read from the run directory and `scontrol`,
without the launcher (torch, submitit) that submitted them."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

JOBS_FILE = "slurm_jobs.jsonl"  # one line per submission: job id, log folder, cluster name


def job_columns(run_dir: Path) -> dict[str, Any]:
    """A submitted run's latest job: its id, SLURM state and restarts (empty for a run never submitted;
    state 'unknown' once SLURM has forgotten the job, or when it ran on another cluster than this one,
    where the same id names another job)."""
    jobs_file = Path(run_dir) / JOBS_FILE
    if not jobs_file.is_file():
        return {}
    latest = json.loads(jobs_file.read_text().splitlines()[-1])
    job, info = latest["job_id"], {}
    if latest.get("cluster") in (None, cluster_name()):
        info = dict(re.findall(r"(\w+)=(\S*)", _scontrol(["show", "job", "-o", job])))
    return {
        "job": job,
        "slurm_state": info.get("JobState", "unknown"),
        "restarts": int(info.get("Restarts", 0)),
    }


def cluster_name() -> str | None:
    """The ClusterName of the cluster SLURM's commands talk to (None where they cannot tell)."""
    found = re.search(r"^ClusterName\s*=\s*(\S+)", _scontrol(["show", "config"]), re.MULTILINE)
    return found.group(1) if found else None


def _scontrol(arguments: list[str]) -> str:
    """What `scontrol ARGUMENTS` prints; '' where it fails."""
    try:
        shown = subprocess.run(["scontrol", *arguments], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return ""
    return shown.stdout if shown.returncode == 0 else ""
