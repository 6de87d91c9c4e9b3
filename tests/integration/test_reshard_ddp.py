"""A run resumed on another number of ranks and data workers: 2 ranks x 2 workers, then 1 rank x 3
workers, then 2 ranks x 1 worker, real gloo ranks and real Trainers on small keyed shards. The global
batch stays 8 (the per-rank batch follows the world size), weights, optimizer and schedule load exactly
as saved, and each epoch, the interrupted one included, trains every sample exactly once."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers.compare import bit_equal
from tests.helpers.ranks import fork_ranks
from tests.helpers.runs import SMALL_MODEL, compose_train, restored_logging
from tests.helpers.shards import keyed_shards
from vlmtrain.checkpoint.manager import latest_checkpoint, read_checkpoint
from vlmtrain.train.trainer import Trainer

SHARDS, PER_SHARD, STEPS_PER_EPOCH = 8, 6, 6  # 48 samples, a global batch of 8


def _config(root: Path, run_dir: Path, workers: int, max_steps: int):
    return compose_train(
        [
            *SMALL_MODEL, f"run_dir={run_dir}", "data.synthetic=null", f"data.train_shards={root}",
            "data.val_shards=null", "data.zeroshot_dir=null", "data.batch_size=4", f"data.num_workers={workers}",
            "data.shuffle_buffer=5", "data.record_keys=true", f"trainer.max_steps={max_steps}",
            "trainer.checkpoint_every=100", "trainer.log_every=1", "trainer.device=cpu",
        ]
    )  # fmt: skip


def _train(root: Path, run_dir: Path, workers: int, max_steps: int) -> dict:
    """Resume (or start) and train to `max_steps`: whether what loaded is what the checkpoint holds."""
    saved_path = latest_checkpoint(run_dir / "checkpoints")
    with Trainer.from_config(_config(root, run_dir, workers, max_steps)) as trainer:
        restored = None
        if saved_path is not None:
            saved = read_checkpoint(saved_path)
            parts = {"model": trainer.model, "optimizer": trainer.optimizer, "scheduler": trainer.scheduler}
            restored = {name: bit_equal(part.state_dict(), saved[name]) for name, part in parts.items()}
        trainer.train()
        batch = trainer.config.data.batch_size
    return {"restored": restored, "batch": batch, "steps_per_epoch": trainer.loader.steps_per_epoch}


def _rank(rank: int, world: int, root: Path, run_dir: Path, workers: int, max_steps: int) -> dict:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # the group exists
    return _train(root, run_dir, workers, max_steps)


def _epoch_keys(run_dir: Path, epoch: int) -> Counter:
    """The keys trained in the steps of `epoch`, over the ranks' key logs."""
    first, last = epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH
    keys: Counter = Counter()
    for log in (run_dir / "keys").glob("rank*.jsonl"):
        for line in log.read_text().splitlines():
            row = json.loads(line)
            if first <= row["step"] <= last:
                keys.update(row["keys"])
    return keys


@pytest.mark.slow
def test_a_run_resumed_on_fewer_then_more_ranks_trains_each_sample_once_per_epoch(tmp_path, caplog):
    """Slow (about 25 s): three launches of a real Trainer, two of them on 2 forked gloo ranks."""
    root, run_dir = tmp_path / "data", tmp_path / "run"
    keyed_shards(root, [PER_SHARD] * SHARDS, size=16)
    for results in ("a", "c"):
        (tmp_path / results).mkdir()
    first = fork_ranks(_rank, 2, tmp_path / "a", root, run_dir, 2, 2, timeout_s=120)
    assert [r["batch"] for r in first] == [4, 4] and first[0]["restored"] is None

    caplog.set_level("INFO", logger="vlmtrain")
    with restored_logging():
        alone = _train(root, run_dir, 3, 4)  # 1 rank x 3 workers, in this process
    assert alone == {"restored": dict.fromkeys(("model", "optimizer", "scheduler"), True), "batch": 8,
                     "steps_per_epoch": STEPS_PER_EPOCH}  # fmt: skip
    applied = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming with "))
    for change in ("data.batch_size 4 -> 8", "data.num_workers 2 -> 3", "world_size 2 -> 1"):
        assert change in applied, applied

    last = fork_ranks(_rank, 2, tmp_path / "c", root, run_dir, 1, 2 * STEPS_PER_EPOCH, timeout_s=120)
    assert [r["batch"] for r in last] == [4, 4]
    assert all(all(r["restored"].values()) for r in last), last
    every = Counter(f"s{s}_{i:05d}" for s in range(SHARDS) for i in range(PER_SHARD))
    assert _epoch_keys(run_dir, 0) == every  # the epoch interrupted twice
    assert _epoch_keys(run_dir, 1) == every
