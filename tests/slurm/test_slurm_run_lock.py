"""Two submissions of one run, a second apart, on the local SLURM cluster: exactly one trains."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.slurm.test_slurm import job_ids, launch_command, losses, slurm, wait_for  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
STEPS = 40


def test_two_submissions_a_second_apart_train_once(slurm, synthetic_root, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    command = launch_command(synthetic_root, run_dir, f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=5")
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    jobs = job_ids(out) + job_ids(second.stdout)
    if second.returncode != 0:  # the first job already held the folder at submission
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert " is in use by pid " in second.stderr
    states = {job: wait_for(job)["JobState"] for job in jobs}
    assert sorted(states.values())[-1] == "COMPLETED", states
    if len(jobs) == 2:  # both submitted: the job that started second ended in one line
        assert sorted(states.values()) == ["COMPLETED", "FAILED"], states
        refused = next(job for job, state in states.items() if state == "FAILED")
        err_log = next((run_dir / "slurm").rglob(f"{refused}_0_log.err")).read_text()
        ours = [line for line in err_log.splitlines() if line.startswith("error: ")]
        assert len(ours) == 1 and re.match(rf"error: {run_dir} is in use by pid \d+ on host ", ours[0]), err_log
    assert [step for step, _ in losses(run_dir)] == list(range(1, STEPS + 1))  # one run, every step once
