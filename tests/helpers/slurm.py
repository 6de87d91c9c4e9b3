"""Submitting `vlmtrain-train cluster=slurm` runs to the local SLURM cluster the tests start, watching and
interrupting their jobs, and reading what they trained."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from tests.helpers.runs import SMALL_MODEL, data_overrides, read_metrics

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(sys.executable).parent
STEPS = 100  # long enough that a watcher's signal arrives mid-run
KILLED_STEPS = 30  # a multi-node run whose rank 1 is killed after step 8, checkpointed every 5 steps
LONG = 3000  # a run that outlasts a cut time limit
COMMON = [
    *SMALL_MODEL,
    "data.batch_size=8",
    "data.num_workers=1",
    "data.val_shards=null",
    "trainer.log_every=1",
    "trainer.checkpoint_every=1000",
    "cluster.cpus_per_task=1",
]


def _ok(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True).returncode == 0


def launch_command(root: Path, run_dir: Path, *overrides: str, time_min: int = 10) -> list[str]:
    """vlmtrain-train cluster=slurm ...: returns at once, printing the job ids."""
    return [
        str(SCRIPTS / "vlmtrain-train"),
        "cluster=slurm",
        f"cluster.time_min={time_min}",
        *data_overrides(root),
        *COMMON,
        f"run_dir={run_dir}",
        *overrides,
    ]


def job_ids(stdout: str) -> list[str]:
    return re.findall(r"submitted job (\S+):", stdout)


def launch(
    root: Path, run_dir: Path, *overrides: str, time_min: int = 10
) -> tuple[subprocess.CompletedProcess, list[str]]:
    command = launch_command(root, run_dir, *overrides, time_min=time_min)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return result, job_ids(result.stdout)


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}


def wait_for(job: str, states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), limit=900):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        info = job_info(job)
        if info.get("JobState") in states:
            return info
        time.sleep(1)
    raise AssertionError(f"job {job} still {job_info(job).get('JobState')} after {limit} s")


def wait_for_steps(run_dir: Path, steps: int, limit=600) -> None:
    """Until metrics.jsonl has `steps` training rows (counted as text: the last line may be half-written)."""
    path, deadline = run_dir / "metrics.jsonl", time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count('"loss"') >= steps:
            return
        time.sleep(0.1)
    raise AssertionError(f"{run_dir} did not reach step {steps}")


def final_weights(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)["model"]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in read_metrics(run_dir) if "loss" in row]


def interrupt(run_dir: Path, job: str, after_steps: int, *command: str) -> threading.Thread:
    """Once the run has logged `after_steps`, run `command` (scancel ..., scontrol ...) against the job."""

    def act() -> None:
        wait_for_steps(run_dir, after_steps)
        subprocess.run([arg.replace("JOB", job) for arg in command], check=True)

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    return thread


def cut_time_limit(run_dir: Path, job: str) -> threading.Thread:
    thread = threading.Thread(target=restore_time_limit, args=(run_dir, job), daemon=True)
    thread.start()
    return thread


def restore_time_limit(run_dir: Path, job: str) -> None:
    """Cut the running job's limit to one minute, so that SLURM's own warning signal (USR2,
    signal_delay_s ahead of the limit) comes at its next check; once requeued, restore it."""
    wait_for_steps(run_dir, 5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=1"], check=True)
    deadline = time.monotonic() + 300
    while job_info(job).get("Restarts", "0") == "0" and time.monotonic() < deadline:
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], check=True)


def signal_at_start(job: str, after_s: float = 1.0) -> threading.Thread:
    """USR2 to the job's tasks `after_s` after it starts running (once its step exists: a signal sent
    before that reaches no task), long before the Trainer's own handler is in place."""

    def act() -> None:
        deadline = time.monotonic() + 300
        while job_info(job).get("JobState") != "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        while f"{job}.0" not in steps(job) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(max(0.0, started + after_s - time.monotonic()))
        subprocess.run(["scancel", "--signal=USR2", job], check=True)

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    return thread


def steps(job: str) -> list[str]:
    return subprocess.run(
        ["squeue", "-h", "-s", "-j", job, "-o", "%i"], capture_output=True, text=True
    ).stdout.split()


def queued() -> set[str]:
    return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split())


def task_pid(job: str, rank: int) -> int | None:
    """The process of the job's task `rank` on this machine (its data workers share its environment
    and command line; the task is the one whose parent is not such a process)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            environ = proc.joinpath("environ").read_bytes().split(b"\0")
            command = proc.joinpath("cmdline").read_bytes()
            parent = int(proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if (
            b"vlmtrain.cluster.job" in command
            and f"SLURM_JOB_ID={job}".encode() in environ
            and f"SLURM_PROCID={rank}".encode() in environ
        ):
            found[int(proc.name)] = parent
    tasks = [pid for pid, parent in found.items() if parent not in found]
    return tasks[0] if tasks else None


def network_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def killed_at(run_dir: Path) -> Path:
    return run_dir.with_name(f"{run_dir.name}.killed")


def kill_rank(run_dir: Path, job: str, after_steps: int, rank: int) -> threading.Thread:
    """Once the run has logged `after_steps`, SIGKILL the job's task `rank`; its node's network
    namespace and the wall time of the kill are written to `killed_at(run_dir)`."""

    def act() -> None:
        wait_for_steps(run_dir, after_steps)
        pid = task_pid(job, rank)
        assert pid, f"no task {rank} of job {job}"
        where = network_namespace(pid)
        os.kill(pid, signal.SIGKILL)
        killed_at(run_dir).write_text(f"{time.time()} {where}")

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    return thread
