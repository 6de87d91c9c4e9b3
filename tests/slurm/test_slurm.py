"""`vlmtrain-train cluster=slurm` on a real single-node SLURM cluster (launch/local-slurm), started by the
suite: jobs launched from Hydra configs, compared with torchrun, preempted, timed out, cancelled,
requeued, and swept as one job array. Jobs are submitted up front and run side by side; the checks of
the entry point alone (bad cluster configs, the runs table) run it in this process."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import SMALL_MODEL, data_overrides, read_metrics, restored_logging
from vlmtrain import cli
from vlmtrain.commands.runs import runs as runs_command

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(sys.executable).parent
STEPS = 100  # long enough that a watcher's signal arrives mid-run
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


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The local cluster: started if not running (and stopped again then); skipped without SLURM."""
    if not shutil.which("slurmctld") or not shutil.which("sbatch"):
        pytest.skip("SLURM is not installed (apt-get install slurm-wlm munge)")
    state = Path(os.environ.get("VLMTRAIN_SLURM_DIR", "/tmp/vlmtrain-slurm"))
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    running = state.joinpath("slurm.conf").exists() and _ok(["scontrol", "ping"])
    if not running:
        subprocess.run(
            ["bash", str(REPO / "launch/local-slurm/start.sh"), str(state)], check=True, timeout=120
        )
    yield state
    if not running:
        subprocess.run(["bash", str(REPO / "launch/local-slurm/stop.sh"), str(state)], timeout=120)


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


SWEEP = ["trainer.max_steps=3", "optim.lr=1e-3,2e-3", "seed=0,1"]  # with -m


@pytest.fixture(scope="module")
def jobs(slurm, synthetic_root, tmp_path_factory):
    """Every job of the module (the sweep's array too), submitted before any test waits (they share the
    cluster's slots), each with a watcher that interrupts it as soon as it has trained a few steps. One
    submission at a time, each watcher started right after its job's: a short job's few steps are not
    raced by other submissions starting up."""
    root = tmp_path_factory.mktemp("slurm-runs")
    two_tasks = ["cluster.tasks_per_node=2", f"trainer.max_steps={STEPS}"]
    rank_1_exits = root / "rank-1-exits"  # on the tasks' PYTHONPATH: rank 1 exits as Python starts
    rank_1_exits.mkdir()
    (rank_1_exits / "sitecustomize.py").write_text(
        'import os\nif os.environ.get("SLURM_PROCID") == "1":\n    os._exit(3)\n'
    )
    usr2, term = ("scancel", "--signal=USR2", "JOB"), ("scancel", "JOB")
    submitted = {}
    for name, overrides, watch in [  # the longest chain (the time limit) first
        ("time_limit", [f"trainer.max_steps={LONG}", "cluster.signal_delay_s=45"], cut_time_limit),
        ("plain", two_tasks, None),
        ("preempted", two_tasks, lambda run, job: interrupt(run, job, 5, *usr2)),
        ("cancelled", [f"trainer.max_steps={STEPS}"], lambda run, job: interrupt(run, job, 3, *term)),
        (
            "exhausted",
            ["trainer.max_steps=3000", "cluster.max_requeues=0"],
            lambda run, job: interrupt(run, job, 2, *usr2),
        ),
        ("one_task_fails", [*two_tasks, f'cluster.setup=["export PYTHONPATH={rank_1_exits}"]'], None),
        ("sweep", SWEEP, None),
    ]:
        command = launch_command(synthetic_root, root / name, *overrides)
        if name == "sweep":  # Hydra's -m comes before the overrides
            command.insert(1, "-m")
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        ids = job_ids(result.stdout)
        assert result.returncode == 0 and len(ids) == (4 if name == "sweep" else 1), result.stderr
        submitted[name] = (root / name, ids if name == "sweep" else ids[0], overrides)
        if watch:
            watch(root / name, ids[0])
    return submitted


@pytest.fixture(scope="module")
def torchrun_reference(synthetic_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("torchrun")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        "-m", "vlmtrain.cli", *data_overrides(synthetic_root), *COMMON, f"trainer.max_steps={STEPS}",
        f"run_dir={run_dir}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_launch_returns_at_once_and_pins_the_run(jobs):
    run_dir, job, _ = jobs["plain"]
    config = (run_dir / "config.yaml").read_text()
    assert f"run_dir: {run_dir}" in config and "${" not in config  # resolved: a requeue reads the same
    assert json.loads((run_dir / "slurm_jobs.jsonl").read_text().splitlines()[0])["job_id"] == job


def test_a_two_task_job_equals_torchrun(jobs, torchrun_reference):
    run_dir, job, _ = jobs["plain"]
    info = wait_for(job)
    assert info["JobState"] == "COMPLETED", info
    assert losses(run_dir) == losses(torchrun_reference)
    ours, theirs = final_weights(run_dir), final_weights(torchrun_reference)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_usr2_saves_requeues_and_resumes_bit_for_bit(jobs, torchrun_reference):
    run_dir, job, _ = jobs["preempted"]
    info = wait_for(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert [step for step, _ in losses(run_dir)] == list(range(1, STEPS + 1))  # every step once
    assert losses(run_dir) == losses(torchrun_reference)
    ours, theirs = final_weights(run_dir), final_weights(torchrun_reference)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_scancel_saves_and_the_same_command_resumes(jobs, synthetic_root):
    run_dir, job, overrides = jobs["cancelled"]
    assert wait_for(job)["JobState"] == "CANCELLED"
    latest = (run_dir / "checkpoints" / "latest").read_text()
    stopped_at = int(latest.removeprefix("step_").removesuffix(".pt"))
    assert 3 <= stopped_at < STEPS and stopped_at == losses(run_dir)[-1][0]  # saved where the signal arrived

    result, ids = launch(synthetic_root, run_dir, *overrides)
    assert result.returncode == 0, result.stderr
    assert wait_for(ids[0])["JobState"] == "COMPLETED"
    assert [step for step, _ in losses(run_dir)] == list(range(1, STEPS + 1))


def test_exhausted_requeues_end_the_job_with_a_clear_message(jobs):
    run_dir, job, _ = jobs["exhausted"]
    info = wait_for(job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    errors = "".join(p.read_text() for p in (run_dir / "slurm").rglob("*_0_log.err"))
    assert "not requeued: cluster.max_requeues=0 reached: run the same command to resume" in errors
    assert (run_dir / "checkpoints" / "latest").exists()


def test_a_task_that_fails_ends_the_job_at_once(jobs):
    """Rank 1 exits (code 3) as it starts, so rank 0 waits for it at the rendezvous, where gloo would
    hold it for 30 minutes (NCCL's collectives hold the same way after a crash): srun's
    --kill-on-bad-exit (cluster.srun_args) ends rank 0 and the job at once."""
    run_dir, job, _ = jobs["one_task_fails"]
    info = wait_for(job)
    assert info["JobState"] == "FAILED", info
    began, ended = (datetime.fromisoformat(info[key]) for key in ("StartTime", "EndTime"))
    assert (ended - began).total_seconds() < 60, info
    assert not (run_dir / "checkpoints" / "latest").exists()


def test_a_time_limit_saves_requeues_and_completes(jobs):
    run_dir, job, _ = jobs["time_limit"]
    info = wait_for(job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, info
    assert [step for step, _ in losses(run_dir)] == list(range(1, LONG + 1))  # every step once
    log = "".join(p.read_text() for p in (run_dir / "slurm").rglob("*_0_log.out"))
    assert "stopped by SIGUSR2" in log and "requeueing job" in log


def test_a_sweep_is_one_job_array(jobs, capsys):
    """`vlmtrain-train -m cluster=slurm ... optim.lr=1e-3,2e-3 seed=0,1` (submitted with the others)."""
    sweep, ids, _ = jobs["sweep"]
    array = {job.split("_")[0] for job in ids}
    assert len(ids) == 4 and len(array) == 1, ids  # one array, four tasks
    for job in ids:
        assert wait_for(job)["JobState"] == "COMPLETED"
    runs = sorted(p.name for p in sweep.iterdir() if (p / "checkpoints").is_dir())
    assert runs == ["0", "1", "2", "3"]
    lrs = sorted(
        float(re.search(r"lr: (\S+)", (sweep / r / "config.yaml").read_text()).group(1)) for r in runs
    )
    assert lrs == [1e-3, 1e-3, 2e-3, 2e-3]
    runs_command([str(sweep), "--csv"])  # vlmtrain-runs DIR --csv
    table = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(table.out)))
    assert len(rows) == 4 and {row["job"] for row in rows} == set(ids), table.out + table.err
    assert {row["state"] for row in rows} == {"finished"} and {row["slurm_state"] for row in rows} == {
        "COMPLETED"
    }


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["cluster.partition=nope"],
            "cluster.partition: no partition 'nope' on this cluster (it has: debug)",
        ),
        (
            ["cluster.gpus_per_node=2"],
            "cluster.gpus_per_node: 2 asked, the nodes of the default partition have 0",
        ),
        (["cluster.time_min=???"], "cluster.time_min"),
    ],
)
def test_a_bad_cluster_config_fails_at_submit_time(
    slurm, synthetic_root, tmp_path, overrides, message, monkeypatch, capsys
):
    """The entry point in this process (the same `vlmtrain-train` code, without a second interpreter)."""
    before = queued()
    argv = launch_command(synthetic_root, tmp_path / "run", *overrides)
    monkeypatch.setattr(sys, "argv", ["vlmtrain-train", *argv[1:]])
    with pytest.raises(SystemExit) as exit_, restored_logging():
        cli.train()
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and not job_ids(out) and len(lines) == 1 and message in lines[0], err
    assert queued() <= before  # nothing submitted (a job ending meanwhile leaves the queue)


def queued() -> set[str]:
    return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split())
