"""Submitting `vlmtrain-train cluster=slurm` runs to the local SLURM cluster the tests start, watching and
interrupting their jobs, and reading what they trained."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tests.helpers.runs import SMALL_MODEL, read_metrics, restored_logging
from vlmtrain.checkpoint.sharded_full import read_full_checkpoint
from vlmtrain.cluster.jobs import JOBS_FILE

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(sys.executable).parent
STEPS = 40  # a run that a watcher's signal reaches mid-run (it acts within a step of its cue)
LONG = 3000  # a run that outlasts a time limit
COMMON = [
    *SMALL_MODEL,
    "data.batch_size=8",
    "data.num_workers=1",
    "trainer.log_every=1",
    "trainer.checkpoint_every=1000",
    "cluster.cpus_per_task=1",
]


def data_overrides(root: Path) -> list[str]:
    """The training shards under `root`, no evaluation (the jobs are compared by their losses and weights)."""
    return [
        "data.synthetic=null",
        f"data.train_shards={root / 'train'}",
        "data.val_shards=null",
        "data.zeroshot_dir=null",
    ]


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


@dataclass
class Submitted:
    code: int
    out: str  # what it printed (from a chain's thread, pytest may take some of it: ids come from `ids`)
    err: str
    ids: list[str]  # the jobs it recorded in the run directory (a sweep: in each point's)

    @property
    def job(self) -> str:
        assert self.code == 0 and len(self.ids) == 1, (self.code, self.ids, self.out + self.err)
        return self.ids[0]


_ENTRY_POINT = threading.Lock()  # Hydra, sys.argv and the standard streams are the process's own


def submit(
    root: Path, run_dir: Path, *overrides: str, time_min: int = 10, multirun: bool = False
) -> Submitted:
    """`vlmtrain-train cluster=slurm ...` run in this process: its code, without a second interpreter that
    imports torch again (a sweep: `-m`, which Hydra wants before the overrides)."""
    from vlmtrain import cli

    argv = launch_command(root, run_dir, *overrides, time_min=time_min)
    argv[0:1] = ["vlmtrain-train", "-m"] if multirun else ["vlmtrain-train"]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with _ENTRY_POINT, restored_logging(), redirect_stdout(out), redirect_stderr(err):
        before, saved, sys.argv = recorded_jobs(run_dir, multirun), sys.argv, argv
        try:
            cli.train()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            sys.argv = saved
    ids = [job for job in recorded_jobs(run_dir, multirun) if job not in before]
    return Submitted(code, out.getvalue(), err.getvalue(), ids)


def recorded_jobs(run_dir: Path, sweep: bool = False) -> list[str]:
    """The job ids in the run's slurm_jobs.jsonl (a sweep: its points', in their order)."""
    files = sorted(run_dir.glob(f"*/{JOBS_FILE}")) if sweep else [run_dir / JOBS_FILE]
    return [json.loads(line)["job_id"] for f in files if f.exists() for line in f.read_text().splitlines()]


def job_ids(stdout: str) -> list[str]:
    return re.findall(r"submitted job (\S+):", stdout)


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def wait_for(job: str, states: tuple[str, ...] = ENDED, limit: float = 600) -> dict[str, str]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        info = job_info(job)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {job_info(job).get('JobState')} after {limit} s")


def wait_for_steps(run_dir: Path, steps: int, limit: float = 600) -> None:
    """Until metrics.jsonl has `steps` training rows (counted as text: the last line may be half-written)."""
    path, deadline = run_dir / "metrics.jsonl", time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count('"loss"') >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run_dir} did not reach step {steps}")


def final_weights(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    """The weights of the run's checkpoint of `step`: a step file, or a sharded run's step folder whole."""
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    if folder.is_dir():
        return read_full_checkpoint(folder, values=())["model"]
    return torch.load(folder.with_suffix(".pt"), weights_only=True)["model"]


def same_weights(run_dir: Path, reference: Path) -> bool:
    ours, theirs = final_weights(run_dir), final_weights(reference)
    return ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in read_metrics(run_dir) if "loss" in row]


def latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step_").removesuffix(".pt"))


def signal_at_start(job: str, tasks: int, after_s: float = 1.0) -> None:
    """USR2 to the job's tasks `after_s` after it starts running, once each task's Python has caught it
    (its first line; a signal before that, while the interpreter itself starts, would end the task),
    long before the Trainer's own handler is in place (torch is not imported yet)."""
    deadline = time.monotonic() + 300
    while job_info(job).get("JobState") != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    while not all(catches(task_pid(job, rank), signal.SIGUSR2) for rank in range(tasks)):
        assert time.monotonic() < deadline, f"the tasks of job {job} did not start"
        time.sleep(0.05)
    time.sleep(max(0.0, started + after_s - time.monotonic()))
    subprocess.run(["scancel", "--signal=USR2", job], check=True)


def catches(pid: int | None, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (its SigCgt mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text() if pid else ""
    except OSError:
        return False
    caught = re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.MULTILINE)
    return bool(caught and int(caught.group(1), 16) >> (signum - 1) & 1)


def steps(job: str) -> list[str]:
    return subprocess.run(
        ["squeue", "-h", "-s", "-j", job, "-o", "%i"], capture_output=True, text=True
    ).stdout.split()


def task_pid(job: str, rank: int) -> int | None:
    """The process of the job's task `rank` on this machine (its data workers share its environment
    and command line; the task is the one whose parent is not such a process)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            environ = proc.joinpath("environ").read_bytes().split(b"\0")
            argv = proc.joinpath("cmdline").read_bytes().split(b"\0")
            parent = int(proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if (
            argv[2:4] == [b"-m", b"vlmtrain.cluster.job"]  # python -u -m ...: the task, not the srun of it
            and f"SLURM_JOB_ID={job}".encode() in environ
            and f"SLURM_PROCID={rank}".encode() in environ
        ):
            found[int(proc.name)] = parent
    tasks = [pid for pid, parent in found.items() if parent not in found]
    return tasks[0] if tasks else None


def network_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def kill_rank(job: str, rank: int) -> tuple[float, str]:
    """SIGKILL the job's task `rank`; returns the wall time of the kill and the task's network namespace."""
    pid = task_pid(job, rank)
    assert pid, f"no task {rank} of job {job}"
    where = network_namespace(pid)
    os.kill(pid, signal.SIGKILL)
    return time.time(), where


class Chains:
    """Named chains of submissions and actions, each in a thread of its own from the start, so that their
    jobs run side by side; a test waits for its chain's result (an error in the chain fails that test)."""

    def __init__(self) -> None:
        self._threads: dict[str, threading.Thread] = {}
        self._results: dict[str, Any] = {}
        self._errors: dict[str, BaseException] = {}
        self._marks: dict[str, threading.Event] = {}

    def start(self, name: str, chain: Callable[..., Any], *args: Any) -> None:
        def run() -> None:
            try:
                self._results[name] = chain(*args)
            except BaseException as error:  # handed to the test that reads this chain
                self._errors[name] = error

        self._threads[name] = threading.Thread(target=run, name=name, daemon=True)
        self._threads[name].start()

    def result(self, name: str, limit: float = 600) -> Any:
        self._threads[name].join(limit)
        assert not self._threads[name].is_alive(), f"{name} still running after {limit} s"
        if name in self._errors:
            raise self._errors[name]
        return self._results[name]

    def mark(self, name: str) -> None:
        """A point that other chains wait for (`wait_mark`)."""
        self._marks.setdefault(name, threading.Event()).set()

    def wait_mark(self, name: str, limit: float = 600) -> None:
        assert self._marks.setdefault(name, threading.Event()).wait(limit), f"no {name!r} after {limit} s"
