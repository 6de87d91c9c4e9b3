"""`vlmtrain-train cluster=slurm` on a real local SLURM cluster (launch/local-slurm, started by the
suite): jobs launched from Hydra configs, compared with torchrun, preempted (at startup too), timed
out, cancelled, requeued, and swept as one job array; their logs. The jobs are submitted as the
session starts (chains.py) and run side by side; `vlmtrain-train` runs in this process."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import datetime

import pytest

from tests.helpers.slurm import (
    LONG,
    STEPS,
    job_ids,
    latest_step,
    losses,
    same_weights,
    submit,
)
from tests.slurm.chains import SWEEP
from vlmtrain.cluster.jobs import cluster_name
from vlmtrain.commands.runs import runs as runs_command

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def test_launch_returns_at_once_and_pins_the_run(runs):
    early = runs.result("early")
    run_dir, job = early["run_dir"], early["job"]
    config = (run_dir / "config.yaml").read_text()
    assert f"run_dir: {run_dir}" in config and "${" not in config  # resolved: a requeue reads the same
    submitted = json.loads((run_dir / "slurm_jobs.jsonl").read_text().splitlines()[0])
    assert submitted["job_id"] == job and submitted["cluster"] == cluster_name()  # ids are per cluster


def test_usr2_saves_requeues_and_resumes_bit_for_bit(runs, references):
    """Two tasks, sent USR2 after step 3: the job saves, requeues, resumes and ends where torchrun's 2
    processes end, bit for bit. (On two nodes: test_multinode.py's faults.)"""
    preempted = runs.result("preempted")
    run_dir, info = preempted["run_dir"], preempted["info"]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert [step for step, _ in losses(run_dir)] == list(range(1, STEPS + 1))  # every step once
    assert losses(run_dir) == losses(references(2))
    assert same_weights(run_dir, references(2))


def test_a_sharded_job_preempted_with_usr2_resumes_bit_for_bit(runs, references):
    """trainer.parallel=fsdp, two tasks, USR2 after step 3: every rank writes its shards into a step
    folder, the job requeues, resumes from that folder and ends where torchrun's 2 sharded processes
    end, bit for bit."""
    preempted = runs.result("preempted_fsdp")
    run_dir, info = preempted["run_dir"], preempted["info"]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert re.search(r"resumed from \S+/checkpoints/step_\d{8}\)", (run_dir / "cli.log").read_text())
    assert [step for step, _ in losses(run_dir)] == list(range(1, STEPS + 1))
    assert losses(run_dir) == losses(references("2-fsdp"))
    assert same_weights(run_dir, references("2-fsdp"))


def test_a_usr2_at_startup_requeues_and_resumes_bit_for_bit(slurm, runs, references):
    """USR2 a second after the job starts. Without a handler from the task's first line, the signal's
    default action ended the job (FAILED, no requeue); with submitit's handler only, it was taken for a
    time-out. On the two-node cluster the job has two tasks on each node (the master on n1) and ends
    where torchrun's 4 processes end, bit for bit (2 and 2 on the single-node one)."""
    early = runs.result("early")
    run_dir, info = early["run_dir"], early["info"]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    world = 4 if slurm.nodes > 1 else 2
    if slurm.nodes > 1:
        assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2" and info["NumTasks"] == "4", info
    assert [step for step, _ in losses(run_dir)] == list(range(1, STEPS + 1))  # every step once
    assert losses(run_dir) == losses(references(world))
    assert same_weights(run_dir, references(world))
    log = next((run_dir / "slurm").rglob("*_0_log.out")).read_text()
    assert re.search(r"stopped by SIGUSR2 at step \d+; checkpoint saved: requeueing job", log), log


def test_the_job_logs_carry_the_training_output(runs):
    """Rank 0's log lines, as a local run prints them, in the SLURM log file and in run_dir/cli.log: where
    the run lives, its progress, the resume after the requeue, the data summary."""
    early = runs.result("early")
    run_dir = early["run_dir"]
    assert early["info"]["JobState"] == "COMPLETED"
    slurm_log = next((run_dir / "slurm").rglob("*_0_log.out")).read_text()
    for log in (slurm_log, (run_dir / "cli.log").read_text()):
        assert f"[vlmtrain][INFO] - run directory {run_dir} (a new run)" in log
        assert f"[vlmtrain][INFO] - step 1/{STEPS} loss " in log
        assert re.search(rf"run directory {run_dir} \(resumed from \S+step_\d+\.pt\)", log), log
        assert f"[vlmtrain][INFO] - step {STEPS}/{STEPS} loss " in log
        assert re.search(r"\[vlmtrain\]\[INFO\] - data: \d+ samples read", log)
    assert "Job has timed out" not in slurm_log  # submitit's handler took this USR2 for a time-out


def test_scancel_saves_and_the_same_command_resumes(runs):
    cancelled = runs.result("cancelled")
    run_dir, stopped = cancelled["run_dir"], cancelled["stopped"]
    assert stopped["info"]["JobState"] == "CANCELLED", stopped
    assert 3 <= stopped["latest"] < STEPS and stopped["latest"] == stopped["logged"]  # saved where it stopped
    assert cancelled["again"]["JobState"] == "COMPLETED", cancelled
    assert [step for step, _ in losses(run_dir)] == list(range(1, STEPS + 1))


def test_a_time_limit_saves_and_with_no_requeue_left_ends_with_a_clear_message(runs):
    """SLURM's own warning before the limit (`--signal=USR2@55`, sent at its next check of the limits):
    the run saves; with cluster.max_requeues=0 the job ends with code 140 (128 + SIGUSR2, as the README
    says) and says how to resume. (A USR2 that is requeued: the tests above.)"""
    limited = runs.result("time_limit")
    run_dir, info = limited["run_dir"], limited["info"]
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0" and info["TimeLimit"] == "00:01:00", info
    assert info["ExitCode"] == "140:0", info
    errors = "".join(p.read_text() for p in (run_dir / "slurm").rglob("*_0_log.err"))
    assert re.search(
        r"stopped by SIGUSR2 at step \d+; checkpoint saved; not requeued: cluster.max_requeues=0 "
        r"reached: run the same command to resume",
        errors,
    ), errors
    trained = losses(run_dir) if (run_dir / "metrics.jsonl").exists() else []  # none: stopped at startup
    assert latest_step(run_dir) == (trained[-1][0] if trained else 0) < LONG


def test_a_task_that_fails_ends_the_job_at_once(runs):
    """Rank 1 exits (code 3) as it starts, so rank 0 waits for it at the rendezvous, where gloo would
    hold it for 30 minutes (NCCL's collectives hold the same way after a crash): srun's
    --kill-on-bad-exit (cluster.srun_args) ends rank 0 and the job at once."""
    failed = runs.result("one_task_fails")
    info = failed["info"]
    assert info["JobState"] == "FAILED", info
    began, ended = (datetime.fromisoformat(info[key]) for key in ("StartTime", "EndTime"))
    assert (ended - began).total_seconds() < 60, info
    assert not (failed["run_dir"] / "checkpoints" / "latest").exists()


def test_a_sweep_is_one_job_array(runs, capsys):
    """`vlmtrain-train -m cluster=slurm ... optim.lr=1e-3,2e-3` (submitted with the others)."""
    swept = runs.result("sweep")
    sweep, ids = swept["dir"], swept["submitted"].ids
    array = {job.split("_")[0] for job in ids}
    assert len(ids) == 2 and len(array) == 1, ids  # one array, two tasks
    printed = swept["submitted"].out + swept["submitted"].err
    assert "Preparing 2 runs, submitted as one SLURM job array" in printed and "locally" not in printed
    assert {info["JobState"] for info in swept["info"].values()} == {"COMPLETED"}, swept["info"]
    points = sorted(p.name for p in sweep.iterdir() if (p / "checkpoints").is_dir())
    assert points == ["0", "1"]
    lrs = sorted(
        float(re.search(r"lr: (\S+)", (sweep / p / "config.yaml").read_text()).group(1)) for p in points
    )
    assert lrs == [1e-3, 2e-3] and "optim.lr=1e-3,2e-3" in SWEEP
    runs_command([str(sweep), "--csv"])  # vlmtrain-runs DIR --csv
    table = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(table.out)))
    assert len(rows) == 2 and {row["job"] for row in rows} == set(ids), table.out + table.err
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
        (["cluster.nodes=9"], "cluster.nodes: 9 asked, the default partition has "),
        (["cluster.time_min=???"], "cluster.time_min"),
        (["cluster.cpus_per_task=64"], "cluster.cpus_per_task: 64 x 1 task(s) per node asked, the nodes of "),
        (
            ["cluster.exclude=n9"],
            # SLURM's own reason differs by cluster ("Invalid node name", "Requested node configuration is
            # not available"): the line is ours up to it
            "cluster: sbatch refused the job: Batch job submission failed: ",
        ),
    ],
)
def test_a_bad_cluster_config_fails_at_submit_time(slurm, slurm_data, tmp_path, overrides, message):
    """The entry point in this process (the same `vlmtrain-train` code, without a second interpreter)."""
    submitted = submit(slurm_data, tmp_path / "run", *overrides)
    lines = submitted.err.strip().splitlines()
    assert submitted.code == 2 and len(lines) == 1 and message in lines[0], submitted.err
    assert (
        not job_ids(submitted.out) and not (tmp_path / "run" / "slurm_jobs.jsonl").exists()
    )  # nothing submitted
