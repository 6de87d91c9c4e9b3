"""A signal to a training run saves a checkpoint at the step boundary and exits; the same command then
resumes, and the run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import SMALL_MODEL, compose_train, data_overrides, read_metrics, run_cli, run_training
from vlmtrain import cli

STEPS = 40


def _command(root: Path, run_dir: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "vlmtrain-train"), *_args(root, run_dir)]


def _args(root: Path, run_dir: Path) -> list[str]:
    return [
        *data_overrides(root),
        *SMALL_MODEL,
        f"run_dir={run_dir}",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every=1",
        "trainer.checkpoint_every=1000",
        "data.batch_size=16",
        "data.num_workers=2",
        "data.val_shards=null",
        "data.zeroshot_dir=null",
    ]


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def whole(synthetic_root, tmp_path_factory) -> Path:
    """The uninterrupted run every stopped one must end equal to (run once for the module, in this
    process: the signals are what needs a process of its own)."""
    run_dir = tmp_path_factory.mktemp("whole")
    run_training(compose_train(_args(synthetic_root, run_dir)))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum,repeats",
    [
        (signal.SIGTERM, 1),
        (signal.SIGUSR1, 1),
        (signal.SIGTERM, 2),
    ],  # SLURM's time limit: TERM twice, ~20 ms apart
)
def test_signal_saves_at_the_step_boundary_and_the_run_resumes_exactly(
    synthetic_root, tmp_path, whole, signum, repeats, capsys
):
    stopped = tmp_path / "stopped"
    # the whole process group gets the signal, data workers included, as under SLURM
    process = subprocess.Popen(
        _command(synthetic_root, stopped), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while _logged_steps(stopped) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    for _ in range(repeats):
        os.killpg(process.pid, signum)
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    step = int((stopped / "checkpoints" / "latest").read_text().removeprefix("step_").removesuffix(".pt"))
    assert 3 <= step < STEPS and step == read_metrics(stopped)[-1]["step"]
    assert f"at step {step}" in stderr and "run the same command to resume" in stderr

    resumed = run_cli(cli.train, _args(synthetic_root, stopped), capsys)  # the same command, in this process
    assert resumed.returncode == 0, resumed.stderr
    assert [row["step"] for row in read_metrics(stopped)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in read_metrics(stopped)] == [r["loss"] for r in read_metrics(whole)]
    a, b = (
        torch.load(d / "checkpoints" / f"step_{STEPS:08d}.pt", weights_only=True) for d in (stopped, whole)
    )
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
