"""A run resumed across `trainer.parallel` kinds and world sizes: 1 ddp rank, then 2 fsdp ranks (real gloo
ranks), then 1 ddp rank again, each a real Trainer on small keyed shards, stopped mid-epoch. After each
resume the weights, the AdamW state and the schedule are the ones saved, to the bit; the run completes,
its checkpoints of both kinds kept `keep_last` together, and the epoch interrupted twice trains every
sample exactly once."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers.forked_runs import join_as_rank, portable
from tests.helpers.ranks import fork_ranks
from tests.helpers.runs import SMALL_MODEL, TINY_TOWERS, compose_train, restored_logging
from tests.helpers.shards import keyed_shards
from tests.integration.test_faults_cli import crafted_run
from tests.integration.test_reshard_ddp import _epoch_keys
from vlmtrain.checkpoint import sharded_manager
from vlmtrain.checkpoint.errors import UnsafeCheckpoint
from vlmtrain.distributed.sharding import full_value
from vlmtrain.train.trainer import Trainer

SHARDS, PER_SHARD = 8, 6  # 48 samples, a global batch of 8: 6 steps an epoch


def _config(root: Path, run_dir: Path, parallel: str, max_steps: int):
    return compose_train(
        [
            *SMALL_MODEL, *TINY_TOWERS, f"run_dir={run_dir}", "data.synthetic=null", f"data.train_shards={root}",
            "data.val_shards=null", "data.zeroshot_dir=null", "data.batch_size=8", "data.num_workers=0",
            "data.shuffle_buffer=5", "data.record_keys=true", f"trainer.max_steps={max_steps}",
            f"trainer.parallel={parallel}", "trainer.checkpoint_every=100", "trainer.device=cpu",
            "trainer.gc_every=0", "schedule.warmup_steps=1",
        ]
    )  # fmt: skip


def _state(trainer: Trainer) -> dict:
    """Every weight and AdamW value by parameter name, full (sharded: gathered, a collective), and the
    schedule: named here by identity, apart from the code that maps a checkpoint's keys."""
    names = {id(param): name for name, param in trainer.model.named_parameters()}
    per_param = {names[id(param)]: values for param, values in trainer.optimizer.state.items()}
    weights = {
        name: full_value(param.detach()).clone() for name, param in sorted(trainer.model.named_parameters())
    }
    optimizer = {
        f"{name}:{key}": full_value(value).clone()
        for name in sorted(per_param)
        for key, value in per_param[name].items()
    }
    return {"weights": weights, "optimizer": optimizer, "scheduler": trainer.scheduler.state_dict()}


def _train(cfg) -> dict:
    """Resume (or start) and train to the end: the state just after the resume, and at the end (saved)."""
    with Trainer.from_config(OmegaConf.create(cfg)) as trainer:
        loaded = _state(trainer) if trainer.resumed_from else None
        trainer.train()
        return {"loaded": loaded, "final": _state(trainer), "batch": trainer.config.data.batch_size}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _rank(rank: int, world: int, cfg: dict) -> dict:
    join_as_rank(rank, world)
    lines, logger = _Lines(), logging.getLogger("vlmtrain")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    read, reads = sharded_manager.read_checkpoint, []
    sharded_manager.read_checkpoint = lambda path: reads.append(Path(path).name) or read(path)
    return _train(cfg) | {"log": lines.lines, "files_read": reads}


def _assert_same(loaded: dict, saved: dict, what: str) -> None:
    """Equal to the bit, a scalar and its 1-element vector alike (how a sharded model holds it)."""
    assert loaded["scheduler"] == saved["scheduler"], what
    for part in ("weights", "optimizer"):
        assert loaded[part].keys() == saved[part].keys(), (what, part)
        for key, value in saved[part].items():
            mine = loaded[part][key]
            assert mine.dtype == value.dtype and torch.equal(mine.reshape(-1), value.reshape(-1)), (what, key)


def _applied(lines: list[str]) -> str:
    return next(line for line in lines if line.startswith("resuming with "))


@pytest.mark.slow
def test_a_run_moves_from_ddp_to_fsdp_and_back_on_other_world_sizes(tmp_path, caplog):
    """Slow (6 s, 15 s with the first ranks of a session): two Trainers in this process (ddp, 1 rank), one
    on 2 forked gloo ranks (fsdp)."""
    root, run_dir, out = tmp_path / "data", tmp_path / "run", tmp_path / "ranks"
    keyed_shards(root, [PER_SHARD] * SHARDS, size=16)
    out.mkdir()
    caplog.set_level("INFO", logger="vlmtrain")
    with restored_logging():
        ddp = _train(_config(root, run_dir, "ddp", 2))
    assert ddp["loaded"] is None

    cfg = portable({"fsdp": _config(root, run_dir, "fsdp", 4)})["fsdp"]
    fsdp = fork_ranks(_rank, 2, out, cfg, timeout_s=120)
    assert [r["batch"] for r in fsdp] == [4, 4]  # the global batch kept over 2 ranks
    # the ddp file is read once, by rank 0, which hands rank 1 its shards and the run state
    assert [r["files_read"] for r in fsdp] == [["step_00000002.pt"], []]
    _assert_same(fsdp[0]["loaded"], ddp["final"], "ddp -> fsdp")
    applied = _applied(fsdp[0]["log"])
    for change in ("trainer.parallel ddp -> fsdp", "data.batch_size 8 -> 4", "world_size 1 -> 2"):
        assert change in applied, applied

    with restored_logging():
        back = _train(_config(root, run_dir, "ddp", 6))
    _assert_same(back["loaded"], fsdp[0]["final"], "fsdp -> ddp")
    assert "trainer.parallel fsdp -> ddp" in _applied([r.getMessage() for r in caplog.records])
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["latest", "step_00000004", "step_00000006.pt"]
    every = Counter(f"s{s}_{i:05d}" for s in range(SHARDS) for i in range(PER_SHARD))
    assert _epoch_keys(run_dir, 0) == every  # the epoch interrupted twice, trained under both kinds


def _refused(rank: int, world: int, cfg: dict) -> dict:
    join_as_rank(rank, world)
    try:
        with Trainer.from_config(OmegaConf.create(cfg)) as trainer:
            trainer.train()
    except UnsafeCheckpoint as error:
        return {"error": str(error)}
    return {"error": None}


@pytest.mark.slow
def test_a_crafted_ddp_file_is_refused_on_every_sharded_rank(tmp_path):
    """Rank 0 alone reads a ddp file into a sharded run: its refusal of a crafted one reaches rank 1,
    which would otherwise wait for the broadcast, and no code runs."""
    run_dir, marker = crafted_run(tmp_path)
    root, out = tmp_path / "data", tmp_path / "ranks"
    keyed_shards(root, [PER_SHARD] * SHARDS, size=16)
    out.mkdir()
    cfg = portable({"fsdp": _config(root, run_dir, "fsdp", 2)})["fsdp"]
    errors = [r["error"] for r in fork_ranks(_refused, 2, out, cfg, timeout_s=60)]
    assert errors[0] is not None and errors == [errors[0]] * 2 and "step_00000001.pt" in errors[0], errors
    assert not marker.exists()
