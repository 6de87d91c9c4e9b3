"""Jobs on two nodes of the local two-node SLURM cluster (launch/local-slurm/two-nodes.sh): each node a
network namespace with its own address and host name, the master on the first node of the job, the
ranks talking over the bridge between them, as on a cluster. The jobs are submitted with the others
(conftest.py); on this cluster the preempted job of test_slurm.py runs on both nodes too."""

from __future__ import annotations

import os
from datetime import datetime

import pytest

from tests.helpers.slurm import (
    KILLED_STEPS,
    killed_at,
    launch,
    losses,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def test_a_killed_rank_on_the_second_node_ends_the_job_and_the_command_resumes(
    two_nodes, jobs, synthetic_root
):
    """SIGKILL of rank 1 (on n2) after step 8: the job ends within seconds, its checkpoint of step 5 is
    complete, and the same command resumes there, training steps 6 to 8 again to the same losses."""
    run_dir, job, overrides = jobs["node_rank_killed"]
    info = wait_for(job)
    assert info["JobState"] == "FAILED", info
    killed, namespace = killed_at(run_dir).read_text().split()
    assert namespace == f"net:[{os.stat('/run/netns/vlmtrain-n2').st_ino}]"  # rank 1 ran on n2
    ended = datetime.fromisoformat(info["EndTime"]).timestamp()
    assert ended - float(killed) < 15, info  # srun --kill-on-bad-exit ends rank 0 on n1
    latest = (run_dir / "checkpoints" / "latest").read_text()
    saved = int(latest.removeprefix("step_").removesuffix(".pt"))
    before = dict(losses(run_dir))
    assert saved % 5 == 0 and 5 <= saved < max(before), (latest, before)

    result, ids = launch(synthetic_root, run_dir, *overrides)
    assert result.returncode == 0, result.stderr
    assert wait_for(ids[0])["JobState"] == "COMPLETED"
    after = dict(losses(run_dir))
    assert sorted(after) == list(range(1, KILLED_STEPS + 1))  # every step once
    assert all(after[step] == before[step] for step in before), (before, after)
