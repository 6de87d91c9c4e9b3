"""Two submissions of one run on the local SLURM cluster: exactly one trains, the other ends in one line
(at submission while the first submitter or job holds the folder, else when its job starts while the
other submitter or job holds it; a job that starts once the other has finished finds the run complete).
The jobs run with the others (chains.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.slurm import losses
from tests.slurm.chains import LOCK_STEPS

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


# the holder a refused job names: a job's task, or (in the race) also the other submission's command
BY_A_JOB = r"\S+ \(since [^,)]+, SLURM job \d+\)"
BY_A_JOB_OR_SUBMITTER = r"\S+ \(since [^,)]+(, SLURM job \d+)?\)"


def _check_one_trained(run_dir: Path, states: dict[str, str], holder: str) -> None:
    assert "COMPLETED" in states.values(), states
    if len(states) == 2 and "FAILED" in states.values():  # both ran at once: the second ended in one line
        assert sorted(states.values()) == ["COMPLETED", "FAILED"], states
        refused = next(job for job, state in states.items() if state == "FAILED")
        err_log = next((run_dir / "slurm").rglob(f"{refused}_0_log.err")).read_text()
        ours = [line for line in err_log.splitlines() if line.startswith("error: ")]
        assert len(ours) == 1, err_log
        assert re.match(rf"error: {run_dir} is in use by pid \d+ on host {holder}", ours[0]), err_log
    assert [step for step, _ in losses(run_dir)] == list(range(1, LOCK_STEPS + 1))  # one run, every step once


def test_two_submissions_a_second_apart_train_once(runs):
    race = runs.result("lock_race")
    run_dir, (code, _, err), second = race["run_dir"], race["first"], race["second"]
    assert code == 0, err
    if second.returncode != 0:  # the first submitter (or its job) held the folder
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert re.match(rf"error: {run_dir} is in use by pid \d+ on host ", second.stderr), second.stderr
    _check_one_trained(run_dir, race["states"], BY_A_JOB_OR_SUBMITTER)


def test_a_second_job_of_a_running_run_ends_in_one_line(runs):
    """Job A submitted held, B submitted and running, then A released: both start up side by side and
    the one that reaches the folder second ends."""
    twin = runs.result("lock_twin")
    assert len(twin["states"]) == 2
    _check_one_trained(twin["run_dir"], twin["states"], BY_A_JOB)
