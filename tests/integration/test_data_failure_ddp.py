"""A training loader that raises on one rank only stops every rank at the same step with the same one-line
DataError naming that rank, instead of that rank alone while the others wait in the gradient all-reduce.
The failing rank steps on a stand-in batch, nothing is updated, and the last checkpoint stays the resume
point. 2 real gloo ranks, each a real Trainer on the synthetic shards."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from contextlib import closing
from pathlib import Path

import pytest
import torch

from tests.helpers.compare import bit_equal
from tests.helpers.ranks import fork_ranks
from tests.helpers.runs import config, read_metrics
from vlmtrain.checkpoint.manager import read_checkpoint
from vlmtrain.data.accounting import DataError
from vlmtrain.data.loader import TrainLoader
from vlmtrain.data.stream import ShardStream
from vlmtrain.distributed.stop import RunStopped
from vlmtrain.train.trainer import Trainer

OVERRIDES = (
    "trainer.max_steps=8",
    "trainer.checkpoint_every=2",
    "trainer.log_every=1",
    "data.batch_size=8",
    "data.val_shards=null",
    "data.zeroshot_dir=null",
)
FAIL_AT = 5  # the batch rank 1's loader fails to give in the mid-run case
INJECTED = "data: cannot resume: sample 3 of /shards/000002.tar is gone (were the shards changed?)"


def _train(rank: int, world: int, root: Path, run_dir: Path, *overrides: str) -> dict:
    """One rank's run; its error (None if it finished), the step it ended at and what it stepped on."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # the group exists
    trainer, stepped = None, []
    try:
        with Trainer.from_config(config(root, run_dir, *OVERRIDES, *overrides)) as trainer:
            real_step = trainer._step

            def recorded(images: torch.Tensor, tokens: torch.Tensor, failed: bool) -> dict:
                stepped.append((images.clone(), tokens.clone(), failed))
                return real_step(images, tokens, failed)

            trainer._step = recorded
            trainer.train()
        return {"error": None, "step": trainer.state.step}
    except DataError as error:
        return {
            "error": str(error),
            "step": trainer.state.step,
            "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "stepped": stepped,
        }


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_shards_unreadable_on_one_rank_stop_both_ranks_at_the_first_step(synthetic_root, tmp_path, workers):
    """Rank 1's pipe: command fails for every shard: its loader raises before its first batch."""
    sizes = json.loads((synthetic_root / "train" / "sizes.json").read_text())
    last = max(int(name.split(".")[0]) for name in sizes)
    cat = f"cat {synthetic_root / 'train'}/{{000000..{last:06d}}}.tar"
    shards = f"data.train_shards='pipe:sh -c \"test $RANK != 1 && {cat}\"'"
    overrides = [shards, f"data.samples_per_epoch={sum(sizes.values())}", f"data.num_workers={workers}"]
    run_dir = tmp_path / "run"
    results = fork_ranks(
        _train, 2, tmp_path, synthetic_root, run_dir, *overrides, "data.shard_retries=0", timeout_s=120
    )
    errors = [r["error"] for r in results]
    assert errors[0] == errors[1] and "\n" not in errors[0], errors  # no rank hung or went on
    pattern = r"data on rank 1: data source 0: no readable sample in \d+ shards in a row \(last pipe:sh -c "
    assert re.match(pattern, errors[0]) and errors[0].endswith("); check the shards"), errors[0]
    assert [r["step"] for r in results] == [0, 0]
    blank = results[1]["stepped"][-1]  # rank 1 had no batch yet: black images, empty captions
    assert blank[2] and blank[0].dtype == torch.uint8 and not blank[0].any()
    assert blank[0].shape == results[0]["stepped"][-1][0].shape
    assert blank[1].shape == results[0]["stepped"][-1][1].shape
    assert not (run_dir / "checkpoints" / "latest").exists()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == f"DataError: {errors[0]}"


def _fail_on_rank_1(rank: int, world: int, root: Path, run_dir: Path, error: Exception) -> dict:
    real_iter = TrainLoader.__iter__

    def failing(self: TrainLoader):
        with closing(real_iter(self)) as batches:
            for number, batch in enumerate(batches, 1):
                if number == FAIL_AT:
                    raise error
                yield batch

    if rank == 1:
        TrainLoader.__iter__ = failing
    try:
        return _train(rank, world, root, run_dir, "data.num_workers=0")
    finally:
        TrainLoader.__iter__ = real_iter


@pytest.mark.slow
@pytest.mark.parametrize(
    ("error", "line"),
    [
        (DataError(INJECTED), INJECTED),
        (OSError(5, "Input/output error"), "OSError: [Errno 5] Input/output error"),
    ],
    ids=["DataError", "OSError"],
)
def test_a_failure_mid_run_on_one_rank_stops_both_without_an_update(synthetic_root, tmp_path, error, line):
    """Rank 1's loader raises at batch 5: both ranks stop at step 4 with the same DataError line; rank 1
    stepped on its batch 4 again; weights, optimizer and schedule on both ranks are checkpoint 4's."""
    run_dir = tmp_path / "run"
    results = fork_ranks(_fail_on_rank_1, 2, tmp_path, synthetic_root, run_dir, error, timeout_s=120)
    expected = f"data on rank 1: {line}"
    assert [r["error"] for r in results] == [expected, expected]
    assert [r["step"] for r in results] == [FAIL_AT - 1] * 2
    stepped = results[1]["stepped"]
    assert [failed for _, _, failed in stepped] == [False] * (FAIL_AT - 1) + [True]
    assert torch.equal(stepped[-1][0], stepped[-2][0]) and torch.equal(stepped[-1][1], stepped[-2][1])
    assert not any(failed for _, _, failed in results[0]["stepped"])
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000004.pt"
    saved = read_checkpoint(checkpoints / "step_00000004.pt")
    assert saved["train_state"]["step"] == FAIL_AT - 1
    for rank, result in enumerate(results):  # the stand-in step changed nothing on any rank
        assert bit_equal(result["model"], saved["model"]), f"rank {rank}: weights"
        assert bit_equal(result["optimizer"], saved["optimizer"]), f"rank {rank}: optimizer"
        assert bit_equal(result["scheduler"], saved["scheduler"]), f"rank {rank}: schedule"
    assert read_metrics(run_dir)[-1]["step"] == FAIL_AT - 1


def _signal_on_rank_1_while_waiting(rank: int, world: int, root: Path, run_dir: Path, at: int | None) -> dict:
    """Rank 1 gets SIGTERM while its stream makes batch `at` (None: no signal); its rank 0 gets none."""
    real_iter = ShardStream.__iter__

    def waiting(self: ShardStream):
        for number, batch in enumerate(real_iter(self), 1):
            if number == at:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler ends the wait at once
                time.sleep(5)  # never over: the wait is interrupted
            yield batch

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # the group exists
    if rank == 1:
        ShardStream.__iter__ = waiting  # data.num_workers=0: the stream runs in the training process
    try:
        with Trainer.from_config(config(root, run_dir, *OVERRIDES, "data.num_workers=0")) as trainer:
            trainer.train()
        return {"stopped": None, "step": trainer.state.step}
    except RunStopped as stopped:
        return {"stopped": str(stopped), "step": trainer.state.step}
    finally:
        ShardStream.__iter__ = real_iter


@pytest.mark.slow
def test_a_signal_while_one_rank_waits_for_data_stops_both_and_the_run_resumes_exactly(
    synthetic_root, tmp_path
):
    """Rank 1 is stopped waiting for batch 4 while rank 0 has its batch: both save step 3 (rank 0's
    batch 4 given back, unused) and stop; the same run resumed ends with the uninterrupted run's losses."""
    run_dir, whole = tmp_path / "run", tmp_path / "whole"
    results = fork_ranks(_signal_on_rank_1_while_waiting, 2, tmp_path, synthetic_root, run_dir, 4)
    assert [r["stopped"] for r in results] == ["stopped by SIGTERM at step 3; checkpoint saved"] * 2
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003.pt"  # not a periodic one
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"
    results = fork_ranks(_signal_on_rank_1_while_waiting, 2, tmp_path, synthetic_root, run_dir, None)
    assert [r["step"] for r in results] == [8, 8]
    fork_ranks(_signal_on_rank_1_while_waiting, 2, tmp_path, synthetic_root, whole, None)
    assert [r["loss"] for r in read_metrics(run_dir)] == [r["loss"] for r in read_metrics(whole)]
