"""A checkpoint write that fails under DDP (rank 0 writes; here a full disk on its second checkpoint)
stops every rank together with the same one-line error, instead of rank 0 alone while the others wait in
the next collective; the previous checkpoint stays intact and resumable. 2 real gloo ranks, each a real
Trainer on the synthetic shards."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from tests.helpers.ranks import fork_ranks
from tests.helpers.runs import config
from vlmtrain.checkpoint import manager as manager_module
from vlmtrain.checkpoint.manager import CheckpointWriteError, read_checkpoint
from vlmtrain.train.trainer import Trainer

OVERRIDES = (
    "trainer.max_steps=6",
    "trainer.checkpoint_every=2",
    "trainer.log_every=1",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.val_shards=null",
    "data.zeroshot_dir=null",
)


def _train_with_a_full_disk_at_step_4(rank: int, world: int, root: Path, run_dir: Path) -> dict:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # the group exists
    real_save, writes = torch.save, []

    def full_disk_on_the_second_write(state: dict, handle: object) -> None:
        writes.append(state["train_state"]["step"])
        if len(writes) == 2:  # part of the file gets written, then the disk is full
            handle.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(state, handle)

    if rank == 0:
        manager_module.torch.save = full_disk_on_the_second_write
    try:
        with Trainer.from_config(config(root, run_dir, *OVERRIDES)) as trainer:
            trainer.train()
        return {"error": None, "step": trainer.state.step}
    except CheckpointWriteError as error:
        return {"error": str(error), "step": trainer.state.step}
    finally:
        manager_module.torch.save = real_save


@pytest.mark.slow
def test_a_failed_write_on_rank_0_stops_both_ranks_with_one_line(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    results = fork_ranks(
        _train_with_a_full_disk_at_step_4, 2, tmp_path, synthetic_root, run_dir, timeout_s=120
    )
    checkpoints = run_dir / "checkpoints"
    intact = checkpoints / "step_00000002.pt"
    expected = f"checkpoint of step 4 not written (No space left on device); {intact} is intact"
    assert [r["error"] for r in results] == [expected, expected]  # no rank hung or went on
    assert [r["step"] for r in results] == [4, 4]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000002.pt"]  # no temp
    assert (checkpoints / "latest").read_text() == intact.name
    saved = read_checkpoint(intact)
    assert saved["train_state"]["step"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values())
