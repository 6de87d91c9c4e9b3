"""Real multi-process training: torchrun (and forked gloo ranks), DDP, rank-0 checkpoints, resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.forked_runs import portable, train_each
from tests.helpers.ranks import fork_ranks
from tests.helpers.runs import SMALL_MODEL, compose_train, data_overrides
from vlmtrain.checkpoint.load import load_pretrained
from vlmtrain.eval.zeroshot import zeroshot_classification


def torchrun_command(run_dir: Path, root: Path, *overrides: str, launcher: str = "torchrun") -> list[str]:
    """`launcher`: torchrun, or vlmtrain-torchrun (the same, exiting with the workers' code)."""
    start = [sys.executable, "-m", "torch.distributed.run"]
    if launcher == "vlmtrain-torchrun":
        start = [str(Path(sys.executable).parent / "vlmtrain-torchrun")]
    return [
        *start,
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "vlmtrain.cli",
        *run_args(run_dir, root, *overrides),
    ]


def run_args(run_dir: Path, root: Path, *overrides: str) -> list[str]:
    return [
        *data_overrides(root),
        *SMALL_MODEL,
        f"run_dir={run_dir}",
        "data.batch_size=8",
        "data.num_workers=1",
        "trainer.log_every=1",
        "data.val_shards=null",
        *overrides,
    ]


def torchrun(run_dir: Path, root: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = torchrun_command(run_dir, root, *overrides)
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def train_twice(launch: str, run_dir: Path, root: Path, *overrides: str) -> None:
    """4 steps, then the same run to 6 (a resume), on 2 ranks: the first under a torchrun of
    `vlmtrain.cli` or on forked gloo ranks; the resume on forked ranks (the run's code, a Trainer on each,
    without three more interpreters)."""
    runs = {
        name: [f"trainer.max_steps={steps}", "trainer.checkpoint_every=2", *overrides]
        for name, steps in (("first", 4), ("second", 6))
    }
    if launch == "torchrun":
        done = torchrun(run_dir, root, *runs.pop("first"))
        assert done.returncode == 0, done.stderr[-3000:]
    configs = {name: compose_train(run_args(run_dir, root, *args)) for name, args in runs.items()}
    fork_ranks(train_each, 2, run_dir.parent / "ranks", portable(configs), timeout_s=120)


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "launch"), [("clip", "torchrun"), ("llip", "forked")])
def test_two_process_run_trains_checkpoints_and_resumes(loss, launch, synthetic_root, tmp_path):
    extra = (
        ["loss=llip", "model.image_encoder.mixture_tokens=4", "model.num_heads=2"] if loss == "llip" else []
    )
    (tmp_path / "ranks").mkdir()
    run_dir = tmp_path / "run"
    train_twice(launch, run_dir, synthetic_root, *extra)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes metrics; the resumed run continues at 5
    assert all(row["samples_per_s"] > 0 for row in rows if "loss" in row)
    saved = torch.load(run_dir / "checkpoints" / "step_00000006.pt", weights_only=True)
    assert saved["train_state"]["samples_seen"] == 6 * 16
    evaluated = json.loads((run_dir / "eval.json").read_text())  # on both ranks, each on half the set
    model, transform, tokenizer = load_pretrained(run_dir / "checkpoints" / "step_00000006.pt")
    alone = zeroshot_classification(model, tokenizer, transform, synthetic_root / "classification")
    assert {k: evaluated[f"zeroshot/{k}"] for k in alone} == pytest.approx(alone, abs=1e-6)


@pytest.mark.slow
def test_sigterm_stops_both_ranks_at_one_step_with_a_checkpoint(synthetic_root, tmp_path, tmp_path_factory):
    """torchrun passes SIGTERM to its workers; the ranks agree on the step, rank 0 saves it, and the
    same run on 2 ranks finishes from there. vlmtrain-torchrun then exits 143 as its workers did (plain
    torchrun exits 1 after any stop)."""
    steps = ["trainer.max_steps=60", "trainer.checkpoint_every=1000", "data.zeroshot_dir=null"]
    command = torchrun_command(tmp_path, synthetic_root, *steps, launcher="vlmtrain-torchrun")
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    stops = re.findall(r"stopped by SIGTERM at step (\d+); checkpoint saved", stderr)
    assert len(stops) == 2 and stops[0] == stops[1], stderr[-3000:]
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    step = int(stops[0])
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{step:08d}.pt"
    # the same run on 2 forked ranks: the resume under DDP, without three more interpreters
    finish = portable({"finish": compose_train(run_args(tmp_path, synthetic_root, *steps))})
    fork_ranks(train_each, 2, tmp_path_factory.mktemp("ranks"), finish, timeout_s=120)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 61))
