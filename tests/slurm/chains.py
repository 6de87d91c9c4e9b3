"""What tests/slurm does to its jobs: one chain per scenario (submit, interrupt, resubmit, wait), all started
together by conftest.py so that their jobs share the cluster's slots; each returns what its tests read.

On the two-node cluster every single-node job keeps off n2 (`cluster.exclude=n2`): n2 is the multi-node
jobs', and `node_lost` takes it down first, before the other multi-node jobs start."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from tests.helpers.slurm import (
    LONG,
    STEPS,
    Chains,
    Submitted,
    job_ids,
    job_info,
    kill_rank,
    latest_step,
    launch_command,
    losses,
    signal_at_start,
    submit,
    wait_for,
    wait_for_steps,
)

SWEEP = ["trainer.max_steps=3", "optim.lr=1e-3,2e-3"]
LOCK_STEPS = 20


def start_all(chains: Chains, cluster: Any, data: Path, root: Path) -> None:
    two = cluster.nodes > 1
    one_node = ["cluster.exclude=n2"] if two else []
    four_ranks = ["cluster.nodes=2", "cluster.tasks_per_node=2"] if two else ["cluster.tasks_per_node=2"]
    steps = f"trainer.max_steps={STEPS}"
    if two:  # the longest chain first: its submission comes first
        chains.start("node_lost", node_lost, chains, cluster, data, root / "node_lost")
        chains.start("rank_killed", rank_killed, chains, data, root / "rank_killed")
    chains.start("early", early, chains, data, root / "early", [*four_ranks, steps])
    chains.start(
        "preempted", preempted, data, root / "preempted", [*one_node, "cluster.tasks_per_node=2", steps]
    )
    chains.start(
        "preempted_fsdp",
        preempted,
        data,
        root / "preempted_fsdp",
        [*one_node, "cluster.tasks_per_node=2", "trainer.parallel=fsdp", steps],
    )
    chains.start("time_limit", time_limit, data, root / "time_limit", one_node)
    chains.start("cancelled", cancelled, data, root / "cancelled", [*one_node, steps])
    chains.start("lock_race", lock_race, data, root / "lock_race", one_node)
    chains.start("lock_twin", lock_twin, data, root / "lock_twin", one_node)
    # in this thread: pytest takes over the standard streams between tests, and this test reads them
    swept = submit(data, root / "sweep", *one_node, *SWEEP, multirun=True)
    chains.start("sweep", sweep, root / "sweep", swept)
    chains.start("one_task_fails", one_task_fails, data, root, [*one_node, "cluster.tasks_per_node=2", steps])


def early(chains: Chains, data: Path, run_dir: Path, overrides: list[str]) -> dict:
    """USR2 one second after the job starts running: requeued, resumed, completed. On two nodes, once n2
    is back from `node_lost`."""
    if "cluster.nodes=2" in overrides:
        chains.wait_mark("n2 back")
    job = submit(data, run_dir, *overrides).job
    signal_at_start(job, tasks=4 if "cluster.nodes=2" in overrides else 2)
    return {"run_dir": run_dir, "job": job, "info": wait_for(job)}


def preempted(data: Path, run_dir: Path, overrides: list[str]) -> dict:
    """USR2 once the run has trained 3 steps: saved, requeued, resumed, completed."""
    job = submit(data, run_dir, *overrides).job
    wait_for_steps(run_dir, 3)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    return {"run_dir": run_dir, "job": job, "info": wait_for(job)}


def cancelled(data: Path, run_dir: Path, overrides: list[str]) -> dict:
    """scancel once the run has trained 3 steps; then the same command again."""
    job = submit(data, run_dir, *overrides).job
    wait_for_steps(run_dir, 3)
    subprocess.run(["scancel", job], check=True)
    info = wait_for(job)
    stopped = {"info": info, "latest": latest_step(run_dir), "logged": losses(run_dir)[-1][0]}
    again = submit(data, run_dir, *overrides).job
    return {"run_dir": run_dir, "stopped": stopped, "again": wait_for(again)}


def time_limit(data: Path, run_dir: Path, overrides: list[str]) -> dict:
    """A one-minute limit whose warning (USR2, 55 s ahead: SLURM's own, at its next check of the limits,
    which it makes every 30 s) comes in the run's first 5 to 35 s; no requeue left. The task trains until
    then: an earlier warning is less CPU taken from the other jobs."""
    limit = ["cluster.signal_delay_s=55", "cluster.max_requeues=0", f"trainer.max_steps={LONG}"]
    job = submit(data, run_dir, *overrides, *limit, time_min=1).job
    return {"run_dir": run_dir, "job": job, "info": wait_for(job)}


def one_task_fails(data: Path, root: Path, overrides: list[str]) -> dict:
    """Rank 1 exits (code 3) as its Python starts: a sitecustomize on the tasks' PYTHONPATH."""
    exits = root / "rank-1-exits"
    exits.mkdir()
    (exits / "sitecustomize.py").write_text(
        'import os\nif os.environ.get("SLURM_PROCID") == "1":\n    os._exit(3)\n'
    )
    run_dir = root / "one_task_fails"
    job = submit(data, run_dir, *overrides, f'cluster.setup=["export PYTHONPATH={exits}"]').job
    return {"run_dir": run_dir, "info": wait_for(job)}


def sweep(sweep_dir: Path, submitted: Submitted) -> dict:
    assert submitted.code == 0, submitted.err
    return {"dir": sweep_dir, "submitted": submitted, "info": {job: wait_for(job) for job in submitted.ids}}


TWO_NODES = [
    "cluster.nodes=2",
    "cluster.tasks_per_node=1",
    f"trainer.max_steps={STEPS}",
    "trainer.checkpoint_every=5",
]
RETRY_S = 65  # slurmctld retries a message to a node that did not answer after 60 s (RPC_RETRY_INTERVAL)


def node_lost(chains: Chains, cluster: Any, data: Path, run_dir: Path) -> dict:
    """A run on two nodes (one task each, a checkpoint every 5 steps) whose n2 fails after step 8, while
    it holds this job alone: its slurmd and everything it runs killed at once. SLURM declares the node
    down and requeues the job; the node comes back (its slurmd started again) and the job resumes. The
    job is held until slurmctld has retried, a minute on, the kill it sent the lost node for the job's
    first run: delivered to the node once back, that kill would end the job's second run (the same id)
    there, which a real node, back after minutes, never sees."""
    try:
        job = submit(data, run_dir, *TWO_NODES).job
        wait_for_steps(run_dir, 8)
        kill_node(cluster.state, "n2")
        deadline = time.monotonic() + 120
        while int(job_info(job).get("Restarts", 0)) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        requeued_at = time.monotonic()
        subprocess.run(["scontrol", "hold", job], check=True)
        requeued = {**job_info(job), "latest": latest_step(run_dir)}  # what the requeue resumes
    finally:
        subprocess.run(cluster.start, check=True, capture_output=True, timeout=120)  # n2 back
        chains.mark("n2 back")
    time.sleep(max(0.0, requeued_at + RETRY_S - time.monotonic()))
    subprocess.run(["scontrol", "release", job], check=True)
    return {"run_dir": run_dir, "requeued": requeued, "info": wait_for(job)}


def rank_killed(chains: Chains, data: Path, run_dir: Path) -> dict:
    """A run on two nodes whose rank 1 (on n2) is killed after step 8; then the same command again."""
    chains.wait_mark("n2 back")
    job = submit(data, run_dir, *TWO_NODES).job
    wait_for_steps(run_dir, 8)
    killed, namespace = kill_rank(job, rank=1)
    info = wait_for(job)
    stopped = {"info": info, "killed": killed, "namespace": namespace, "latest": latest_step(run_dir)}
    stopped["losses"] = dict(losses(run_dir))
    again = submit(data, run_dir, *TWO_NODES).job
    return {"run_dir": run_dir, "stopped": stopped, "again": wait_for(again)}


def kill_node(state: Path, node: str) -> None:
    """A node failing, as SLURM sees it: its slurmd and every process it started (job steps, tasks, their
    data workers) gone at once; the node's namespace stays, as its address would."""
    pids = subprocess.run(["ip", "netns", "pids", f"vlmtrain-{node}"], capture_output=True, text=True).stdout
    subprocess.run(["kill", "-9", *pids.split()], check=False)


def lock_race(data: Path, run_dir: Path, overrides: list[str]) -> dict:
    """Two `vlmtrain-train` commands submitting one run a second apart (each its own process)."""
    command = launch_command(
        data, run_dir, *overrides, f"trainer.max_steps={LOCK_STEPS}", "trainer.checkpoint_every=5"
    )
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=300)
    states = {job: wait_for(job)["JobState"] for job in job_ids(out) + job_ids(second.stdout)}
    return {"run_dir": run_dir, "first": (first.returncode, out, err), "second": second, "states": states}


def lock_twin(data: Path, run_dir: Path, overrides: list[str]) -> dict:
    """As a re-submitted job beside its requeued twin: job A is submitted held (so its submitter has let go
    of the folder), B is submitted and starts, then A is released: both start up side by side."""
    overrides = [*overrides, f"trainer.max_steps={LOCK_STEPS}", "trainer.checkpoint_every=5"]
    first = submit(data, run_dir, *overrides, "+cluster.additional_parameters.hold=true").job
    second = submit(data, run_dir, *overrides).job
    wait_for(second, states=("RUNNING",))
    subprocess.run(["scontrol", "release", first], check=True)
    return {"run_dir": run_dir, "states": {job: wait_for(job)["JobState"] for job in (first, second)}}
