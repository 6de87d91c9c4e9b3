"""A sharded run (`trainer.parallel=fsdp`) on 2 real gloo ranks, SIGKILLed, then started again with the
same config, ends bit for bit where the uninterrupted run does: killed at a random step, and killed while
one rank's background write (`trainer.async_checkpoint`) of a step hangs, training going on meanwhile, so
that the previous step is resumed and the write's leftovers are swept."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from tests.helpers.ranks import fork_ranks, start_ranks
from tests.helpers.runs import config
from tests.integration.test_fsdp_trainer import TINY, join_as_rank, train

STEPS = 8
OVERRIDES = (*TINY, f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=2", "trainer.parallel=fsdp")


def _train(rank: int, world: int, cfg) -> dict:
    join_as_rank(rank, world)
    return train(cfg)


def _train_stalling_rank_1(rank: int, world: int, cfg) -> dict:
    """Rank 1's second write (step 4's) puts its shards on disk, then never returns: the step's metadata
    and rename never come."""
    if rank == 1:
        real, calls = FileSystemWriter.write_data, []

        def write_then_hang(self, plan, planner):
            calls.append(plan)
            written = real(self, plan, planner)
            if len(calls) == 2:
                written.wait()
                time.sleep(600)
            return written

        FileSystemWriter.write_data = write_then_hang
    return _train(rank, world, cfg)


@pytest.fixture(scope="module")
def whole(synthetic_root, tmp_path_factory) -> dict:
    """The uninterrupted run (synchronous checkpoints) the others must end equal to."""
    out = tmp_path_factory.mktemp("whole")
    return fork_ranks(_train, 2, out, config(synthetic_root, out / "run", *OVERRIDES), timeout_s=120)[0]


def _logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _kill_when(ranks, ready: Callable[[], bool], timeout_s: float = 120) -> None:
    """SIGKILL every rank once `ready()`."""
    deadline = time.monotonic() + timeout_s
    while not ready() and time.monotonic() < deadline and all(p.is_alive() for p in ranks.processes):
        time.sleep(0.01)
    assert ready(), "the run ended or stalled before the point to kill it at"
    for process in ranks.processes:
        os.kill(process.pid, signal.SIGKILL)
    for process in ranks.processes:
        process.join()


def _assert_same(resumed: dict, whole: dict) -> None:
    assert [r["step"] for r in resumed["rows"]] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed["rows"]] == [r["loss"] for r in whole["rows"]]
    assert resumed["weights"].keys() == whole["weights"].keys()
    for key, value in whole["weights"].items():
        assert torch.equal(resumed["weights"][key], value), key


@pytest.mark.slow
def test_killed_at_a_random_step_resumes_bit_identical(synthetic_root, tmp_path, whole):
    """Slow: two runs of 2 forked ranks (the killed one and its resume)."""
    killed_at = random.Random().randint(3, STEPS - 1)
    cfg = config(synthetic_root, tmp_path / "run", *OVERRIDES)
    _kill_when(start_ranks(_train, 2, tmp_path, cfg), lambda: _logged(tmp_path / "run") >= killed_at)
    checkpoints = tmp_path / "run" / "checkpoints"
    saved = int((checkpoints / "latest").read_text().removeprefix("step_"))
    assert 2 <= saved <= killed_at + 1, killed_at

    _assert_same(fork_ranks(_train, 2, tmp_path, cfg, timeout_s=120)[0], whole)
    assert sorted(os.listdir(checkpoints)) == ["latest", "step_00000006", f"step_{STEPS:08d}"]


@pytest.mark.slow
def test_killed_during_a_background_write_resumes_the_previous_step(synthetic_root, tmp_path, whole):
    """Slow: two runs of 2 forked ranks. Step 4's write hangs on rank 1 while both ranks train on to step
    6, whose save waits for it; killed there, the run resumes from step 2, exactly."""
    cfg = config(synthetic_root, tmp_path / "run", *OVERRIDES, "trainer.async_checkpoint=true")
    checkpoints = tmp_path / "run" / "checkpoints"
    rank_1_written = checkpoints / ".step_00000004.tmp" / "__1_0.distcp"
    ranks = start_ranks(_train_stalling_rank_1, 2, tmp_path, cfg)
    _kill_when(ranks, lambda: rank_1_written.exists() and _logged(tmp_path / "run") >= 6)
    assert (checkpoints / "latest").read_text() == "step_00000002"
    assert sorted(os.listdir(checkpoints)) == [".step_00000004.tmp", "latest", "step_00000002"]

    _assert_same(fork_ranks(_train, 2, tmp_path, cfg, timeout_s=120)[0], whole)
    assert sorted(os.listdir(checkpoints)) == ["latest", "step_00000006", f"step_{STEPS:08d}"]
