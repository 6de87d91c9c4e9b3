"""`vlmtrain-train cluster=slurm` on a real local SLURM cluster (launch/local-slurm, started by the
suite): jobs launched from Hydra configs, compared with torchrun, preempted (at startup too), timed
out, cancelled, requeued, and swept as one job array; their logs. The jobs are submitted up front
(conftest.py) and run side by side; the checks of the entry point alone (bad cluster configs, the runs
table) run it in this process."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from datetime import datetime

import pytest
import torch

from tests.helpers.runs import restored_logging
from tests.helpers.slurm import (
    LONG,
    STEPS,
    final_weights,
    job_ids,
    launch,
    launch_command,
    losses,
    queued,
    wait_for,
)
from vlmtrain import cli
from vlmtrain.cluster.jobs import cluster_name
from vlmtrain.commands.runs import runs as runs_command

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def test_launch_returns_at_once_and_pins_the_run(jobs):
    run_dir, job, _ = jobs["plain"]
    config = (run_dir / "config.yaml").read_text()
    assert f"run_dir: {run_dir}" in config and "${" not in config  # resolved: a requeue reads the same
    submitted = json.loads((run_dir / "slurm_jobs.jsonl").read_text().splitlines()[0])
    assert submitted["job_id"] == job and submitted["cluster"] == cluster_name()  # ids are per cluster


def test_a_two_task_job_equals_torchrun(jobs, torchrun_reference):
    run_dir, job, _ = jobs["plain"]
    info = wait_for(job)
    assert info["JobState"] == "COMPLETED", info
    assert losses(run_dir) == losses(torchrun_reference)
    ours, theirs = final_weights(run_dir), final_weights(torchrun_reference)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_usr2_saves_requeues_and_resumes_bit_for_bit(slurm, jobs, torchrun_reference):
    """Two ranks, sent USR2 at step 5: on the two-node cluster one on each node, the master on n1."""
    run_dir, job, _ = jobs["preempted"]
    info = wait_for(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    if slurm.nodes > 1:
        assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2", info
    assert [step for step, _ in losses(run_dir)] == list(range(1, STEPS + 1))  # every step once
    assert losses(run_dir) == losses(torchrun_reference)
    ours, theirs = final_weights(run_dir), final_weights(torchrun_reference)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_a_usr2_at_startup_requeues_and_resumes_bit_for_bit(early_usr2, torchrun_reference):
    """Without a handler from the task's first line, the signal's default action ended the job (FAILED,
    no requeue); with submitit's handler only, it was taken for a time-out."""
    run_dir, job = early_usr2
    info = wait_for(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert [step for step, _ in losses(run_dir)] == list(range(1, STEPS + 1))  # every step once
    assert losses(run_dir) == losses(torchrun_reference)
    ours, theirs = final_weights(run_dir), final_weights(torchrun_reference)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    log = next((run_dir / "slurm").rglob("*_0_log.out")).read_text()
    assert re.search(r"stopped by SIGUSR2 at step \d+; checkpoint saved: requeueing job", log), log


def test_the_job_logs_carry_the_training_output(early_usr2):
    """Rank 0's log lines, as a local run prints them, in the SLURM log file and in run_dir/cli.log: where
    the run lives, its progress, the resume after the requeue, the data summary."""
    run_dir, job = early_usr2
    assert wait_for(job)["JobState"] == "COMPLETED"
    slurm_log = next((run_dir / "slurm").rglob("*_0_log.out")).read_text()
    for log in (slurm_log, (run_dir / "cli.log").read_text()):
        assert f"[vlmtrain][INFO] - run directory {run_dir} (a new run)" in log
        assert f"[vlmtrain][INFO] - step 1/{STEPS} loss " in log
        assert re.search(rf"run directory {run_dir} \(resumed from \S+step_\d+\.pt\)", log), log
        assert f"[vlmtrain][INFO] - step {STEPS}/{STEPS} loss " in log
        assert re.search(r"\[vlmtrain\]\[INFO\] - data: \d+ samples read", log)
    assert "Job has timed out" not in slurm_log  # submitit's handler took this USR2 for a time-out


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
    assert info["ExitCode"] == "140:0", info  # 128 + SIGUSR2, as the README says
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
    printed = sweep.with_name("sweep.submitted").read_text()
    assert "Preparing 4 runs, submitted as one SLURM job array" in printed and "locally" not in printed
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
        (["cluster.nodes=9"], "cluster.nodes: 9 asked, the default partition has "),
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
