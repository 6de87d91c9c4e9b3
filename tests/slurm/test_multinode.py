"""Jobs on two nodes of the local two-node SLURM cluster (launch/local-slurm/two-nodes.sh): each node a
network namespace with its own address and host name, the master on the first node of the job, the
ranks talking over the bridge between them, as on a cluster. The jobs run with the others (chains.py);
on this cluster the job of test_slurm.py sent USR2 at startup has two tasks on each node."""

from __future__ import annotations

import os
from datetime import datetime

import pytest

from tests.helpers.slurm import STEPS, losses, same_weights

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def test_a_node_lost_mid_job_is_requeued_and_the_run_loses_nothing_but_the_steps_since_its_checkpoint(
    two_nodes, runs, references
):
    """n2 fails after step 8 (its slurmd, the job's task and everything else it ran killed at once): SLURM
    declares the node down and requeues the job; once n2 is back the job resumes from the checkpoint
    the run had when the node died and ends where torchrun's 2 processes end, bit for bit."""
    lost = runs.result("node_lost")
    run_dir, requeued, info = lost["run_dir"], lost["requeued"], lost["info"]
    assert int(requeued["Restarts"]) >= 1 and requeued["latest"] % 5 == 0 and requeued["latest"] >= 5, (
        requeued
    )
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]", info
    log = (run_dir / "cli.log").read_text()
    assert f"(resumed from {run_dir}/checkpoints/step_{requeued['latest']:08d}.pt)" in log, log
    reference = dict(losses(references(2)))
    assert dict(losses(run_dir)) == reference and sorted(reference) == list(range(1, STEPS + 1))
    assert same_weights(run_dir, references(2))


def test_a_killed_rank_on_the_second_node_ends_the_job_and_the_command_resumes(two_nodes, runs, references):
    """SIGKILL of rank 1 (on n2) after step 8: the job ends within seconds with its last checkpoint
    complete; the same command resumes there and ends where torchrun's 2 processes end, bit for bit."""
    killed = runs.result("rank_killed")
    run_dir, stopped = killed["run_dir"], killed["stopped"]
    info = stopped["info"]
    assert info["JobState"] == "FAILED", info
    assert stopped["namespace"] == f"net:[{os.stat('/run/netns/vlmtrain-n2').st_ino}]"  # rank 1 ran on n2
    ended = datetime.fromisoformat(info["EndTime"]).timestamp()
    assert ended - stopped["killed"] < 15, info  # srun --kill-on-bad-exit ends rank 0 on n1
    # a checkpoint every 5 steps; under load the run may reach the next one before the kill lands
    assert stopped["latest"] % 5 == 0 and 5 <= stopped["latest"] <= max(stopped["losses"]), stopped
    assert killed["again"]["JobState"] == "COMPLETED", killed["again"]
    reference = dict(losses(references(2)))
    assert dict(losses(run_dir)) == reference
    assert all(stopped["losses"][step] == reference[step] for step in stopped["losses"])
    assert same_weights(run_dir, references(2))
