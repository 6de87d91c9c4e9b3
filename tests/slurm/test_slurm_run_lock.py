"""Two submissions of one run on the local SLURM cluster: exactly one trains, the other ends in one line
(at submission while the first submitter or job holds the folder, else when its job starts)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.slurm import job_ids, launch_command, losses, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
STEPS = 40
RUN = {"capture_output": True, "text": True, "timeout": 300}


def _command(root: Path, run_dir: Path) -> list[str]:
    return launch_command(root, run_dir, f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=5")


def _check_one_trained(run_dir: Path, jobs: list[str]) -> dict[str, str]:
    states = {job: wait_for(job)["JobState"] for job in jobs}
    assert "COMPLETED" in states.values(), states
    if len(jobs) == 2:  # both submitted: the job that started second ended in one line
        assert sorted(states.values()) == ["COMPLETED", "FAILED"], states
        refused = next(job for job, state in states.items() if state == "FAILED")
        err_log = next((run_dir / "slurm").rglob(f"{refused}_0_log.err")).read_text()
        ours = [line for line in err_log.splitlines() if line.startswith("error: ")]
        assert len(ours) == 1, err_log
        assert re.match(rf"error: {run_dir} is in use by pid \d+ on host .*SLURM job \d+\)", ours[0]), err_log
    assert [step for step, _ in losses(run_dir)] == list(range(1, STEPS + 1))  # one run, every step once
    return states


def test_two_submissions_a_second_apart_train_once(slurm, synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        _command(synthetic_root, run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(1)
    second = subprocess.run(_command(synthetic_root, run_dir), capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    if second.returncode != 0:  # the first submitter (or its job) held the folder
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert re.match(rf"error: {run_dir} is in use by pid \d+ on host ", second.stderr), second.stderr
    _check_one_trained(run_dir, job_ids(out) + job_ids(second.stdout))


def test_a_second_job_of_a_running_run_ends_in_one_line(slurm, synthetic_root, tmp_path):
    """As a re-submitted job beside its requeued twin: job A is submitted held (so its submitter has
    let go of the folder), B is submitted and starts, then A is released: both jobs start side by side
    and the one that reaches the folder second ends."""
    run_dir, command = tmp_path / "run", _command(synthetic_root, tmp_path / "run")
    held = subprocess.run([*command, "+cluster.additional_parameters.hold=true"], **RUN)
    assert held.returncode == 0, held.stderr
    running = subprocess.run(command, **RUN)
    assert running.returncode == 0, running.stderr
    first, second = job_ids(held.stdout)[0], job_ids(running.stdout)[0]
    wait_for(second, states=("RUNNING",))
    subprocess.run(["scontrol", "release", first], check=True)  # both start up side by side
    _check_one_trained(run_dir, [first, second])
