"""`trainer.parallel=fsdp` through the Trainer, on 2 real gloo ranks, each a real Trainer on the synthetic
shards. It equals `ddp` for CLIP, SigLIP and Llip with 2 micro-batches and clipping acting on every step:
the same per-step losses and gradient norms (the full norm of the sharded gradients) and final weights.
SIGKILLed and started again with the same config, a sharded run ends bit for bit where the uninterrupted
one does: killed at a random step, and killed while one rank's background write
(`trainer.async_checkpoint`) of a step hangs, training going on meanwhile, so that the previous step is
resumed and the write's leftovers are swept."""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import time
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint import FileSystemWriter

from tests.helpers.forked_runs import join_as_rank, kill_when, portable, train
from tests.helpers.ranks import fork_ranks, start_ranks
from tests.helpers.runs import LOSSES, TINY_TOWERS, config, run_cli
from vlmtrain import cli
from vlmtrain.checkpoint.errors import CheckpointWriteError

STEPS, CLIP_AT = 5, 0.5  # a clip norm below every step's gradient norm here: clipping acts
RUN = (  # the tiny towers, and a short run of them
    *TINY_TOWERS,
    "data.batch_size=8",
    "data.num_workers=0",
    "data.shuffle_buffer=16",  # the first batch decodes this many samples
    "data.val_shards=null",
    "data.zeroshot_dir=null",
    "trainer.log_every=1",
    "trainer.gc_every=0",  # no full collection when the loop starts: a second each in a test process
    "schedule.warmup_steps=1",
    f"trainer.max_steps={STEPS}",
    "trainer.micro_batches=2",
    f"trainer.grad_clip={CLIP_AT}",
)
LOSS_NAMES = ("clip", "siglip", "llip")
FULL_DISK = "full disk"


def _train_each(rank: int, world: int, configs: dict) -> dict:
    join_as_rank(rank, world)
    return {key: _full_disk(cfg, rank) if key == FULL_DISK else train(cfg) for key, cfg in configs.items()}


def _full_disk(cfg: DictConfig, rank: int) -> dict:
    """Rank 1 finds the disk full at its second write (step 4's): the error this rank stops with."""
    real, calls = FileSystemWriter.write_data, []

    def full(self, plan, planner):
        calls.append(plan)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, plan, planner)

    FileSystemWriter.write_data = full if rank == 1 else real
    try:
        train(cfg)
    except CheckpointWriteError as error:
        return {"error": str(error)}
    finally:
        FileSystemWriter.write_data = real
    return {"error": None}


def with_values(cfg: DictConfig, run_dir: Path, values: dict[str, object]) -> DictConfig:
    """A copy of a composed config in another run_dir, with values changed by dotted key."""
    cfg = copy.deepcopy(cfg)
    cfg.run_dir = str(run_dir)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory) -> dict:
    """Every loss under ddp and fsdp, uninterrupted, in one session of 2 forked ranks (the ranks' first
    sharded run warms the sharding's caches for the others); the configs are composed once, here. CLIP's
    runs end with a zero-shot evaluation (under fsdp on both ranks, as the model is sharded). Last, in
    the same warm session, a sharded run whose background write fails on rank 1 (FULL_DISK)."""
    out = tmp_path_factory.mktemp("trained")
    configs = {}
    for loss in LOSS_NAMES:
        cfg = config(synthetic_root, out, *RUN, *LOSSES.get(loss, ["loss=clip"]))
        zeroshot = str(synthetic_root / "classification") if loss == "clip" else None
        for parallel in ("ddp", "fsdp"):
            values = {"trainer.parallel": parallel, "data.zeroshot_dir": zeroshot}
            configs[(loss, parallel)] = with_values(cfg, out / f"{loss}-{parallel}", values)
    values = {"trainer.checkpoint_every": 2, "trainer.async_checkpoint": True, "data.zeroshot_dir": None}
    configs[FULL_DISK] = with_values(configs[("clip", "fsdp")], out / "full-disk", values)
    results = fork_ranks(_train_each, 2, out, portable(configs), timeout_s=180)
    return {"results": results[0], "configs": configs, "full disk": [r[FULL_DISK] for r in results]}


@pytest.mark.slow
def test_fsdp_trains_like_ddp_through_the_trainer(trained):
    """Slow: 6 short runs on 2 forked ranks (the module's fixture)."""
    for loss in LOSS_NAMES:
        ddp, fsdp = trained["results"][(loss, "ddp")], trained["results"][(loss, "fsdp")]
        assert (
            [r["step"] for r in fsdp["rows"]] == [r["step"] for r in ddp["rows"]] == list(range(1, STEPS + 1))
        )
        for name in ("loss", "grad_norm"):
            expected = [r[name] for r in ddp["rows"]]
            torch.testing.assert_close([r[name] for r in fsdp["rows"]], expected, rtol=1e-5, atol=0, msg=loss)
        assert min(r["grad_norm"] for r in ddp["rows"]) > CLIP_AT
        assert fsdp["weights"].keys() == ddp["weights"].keys()
        for key, value in ddp["weights"].items():
            torch.testing.assert_close(fsdp["weights"][key], value, rtol=1e-5, atol=1e-5, msg=f"{loss} {key}")
    clip = trained["results"][("clip", "ddp")]["eval"]
    assert clip["zeroshot/num_classes"] > 1
    torch.testing.assert_close(trained["results"][("clip", "fsdp")]["eval"], clip, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_failed_background_write_stops_every_rank_with_one_line(trained):
    """Slow: part of the module's fixture. Step 4's write fails on rank 1 in the background; the ranks
    learn it when the last save waits for it, and stop together with the same line."""
    checkpoints = Path(trained["configs"][FULL_DISK].run_dir) / "checkpoints"
    intact = checkpoints / "step_00000002"
    expected = f"checkpoint of step 4 not written (No space left on device); {intact} is intact"
    assert [r["error"] for r in trained["full disk"]] == [expected, expected]
    assert sorted(os.listdir(checkpoints)) == ["latest", "step_00000002"]  # no temporary folder left


def _train_stalling_rank_1(rank: int, world: int, configs: dict) -> dict:
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
    return _train_each(rank, world, configs)


def _logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _listing(run_dir: Path) -> list[str]:
    return sorted(os.listdir(run_dir / "checkpoints"))


@pytest.mark.slow
def test_killed_sharded_runs_resume_bit_identical(trained, tmp_path):
    """Slow: three sessions of 2 forked ranks (two killed runs, then both resumed in one). Checkpoints
    every 2 steps; the uninterrupted run is the fixture's (checkpointing changes nothing it computes)."""
    base = trained["configs"][("clip", "fsdp")]
    at_random, stalled = tmp_path / "at_random", tmp_path / "stalled"
    values = {"trainer.checkpoint_every": 2, "data.zeroshot_dir": None}
    configs = {
        "at_random": with_values(base, at_random, values),
        "stalled": with_values(base, stalled, values | {"trainer.async_checkpoint": True}),
    }
    killed_at = random.Random().randint(3, STEPS - 1)
    ranks = start_ranks(
        _train_each, 2, tmp_path, portable({"at_random": configs["at_random"]}), timeout_s=180
    )
    kill_when(ranks, lambda: _logged(at_random) >= killed_at)
    assert (at_random / "checkpoints" / "latest").read_text() in ("step_00000002", "step_00000004"), killed_at

    # step 4's write hangs on rank 1 while both ranks train on to step 5, whose save waits for it
    rank_1_written = stalled / "checkpoints" / ".step_00000004.tmp" / "__1_0.distcp"
    ranks = start_ranks(
        _train_stalling_rank_1, 2, tmp_path, portable({"stalled": configs["stalled"]}), timeout_s=180
    )
    kill_when(ranks, lambda: rank_1_written.exists() and _logged(stalled) >= STEPS)
    assert (stalled / "checkpoints" / "latest").read_text() == "step_00000002"
    assert _listing(stalled) == [".step_00000004.tmp", "latest", "step_00000002"]

    resumed = fork_ranks(_train_each, 2, tmp_path, portable(configs), timeout_s=180)[0]
    whole = trained["results"][("clip", "fsdp")]
    for name, run_dir in (("at_random", at_random), ("stalled", stalled)):
        assert [r["step"] for r in resumed[name]["rows"]] == list(range(1, STEPS + 1)), name
        assert [r["loss"] for r in resumed[name]["rows"]] == [r["loss"] for r in whole["rows"]], name
        assert resumed[name]["weights"].keys() == whole["weights"].keys()
        for key, value in whole["weights"].items():
            assert torch.equal(resumed[name]["weights"][key], value), f"{name} {key} (killed at {killed_at})"
        assert _listing(run_dir) == ["latest", "step_00000004", f"step_{STEPS:08d}"], name


@pytest.mark.slow
def test_a_sharded_runs_checkpoint_is_evaluated_in_one_process_as_the_run_did(trained, capsys):
    """Slow: part of the module's fixture. `vlmtrain-eval` on the sharded CLIP run's folder, in this
    process with no process group, reads the step folder (weights from the ranks' shards, the config
    from the run state beside them) and scores what the run's own final evaluation on 2 ranks did."""
    run_dir = Path(trained["configs"][("clip", "fsdp")].run_dir)
    evaluated = run_cli(cli.evaluate, [f"checkpoint={run_dir}"], capsys)
    assert evaluated.returncode == 0, evaluated.stderr
    (written,) = (run_dir / "eval").glob("*.json")
    metrics = json.loads(written.read_text())["metrics"]
    expected = trained["results"][("clip", "fsdp")]["eval"]
    assert metrics.keys() >= expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
