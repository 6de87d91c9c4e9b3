"""`trainer.parallel=fsdp` through the Trainer equals `ddp`: 2 real gloo ranks, each a real Trainer on the
synthetic shards, for CLIP, SigLIP and Llip with 2 micro-batches and clipping acting on every step; the
same per-step losses and gradient norms (the full norm of the sharded gradients) and final weights."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from tests.helpers.ranks import fork_ranks
from tests.helpers.runs import LOSSES, config, read_metrics
from vlmtrain.distributed.sharding import full_state_dict
from vlmtrain.train import trainer as trainer_module
from vlmtrain.train.trainer import Trainer

CLIP_AT = 0.5  # below every step's gradient norm here: clipping acts
TINY = (  # the smallest towers the other tests train: 32-pixel images, 16 tokens
    "model.image_encoder.vision_cfg.image_size=32",
    "model.image_encoder.vision_cfg.patch_size=8",
    "model.text_encoder.context_length=16",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.shuffle_buffer=16",  # the first batch decodes this many samples
    "data.val_shards=null",
    "data.zeroshot_dir=null",
    "trainer.log_every=1",
    "schedule.warmup_steps=1",
    "trainer.gc_every=0",  # no full collection when the loop starts: a second each in a test process
)


def join_as_rank(rank: int, world: int) -> None:
    """In a forked rank: the variables torchrun sets (the group exists already), and no run figure (the
    figure is rank 0's report, seconds of drawing on a loaded CPU, not part of what these tests show)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    trainer_module.write_run_plot = lambda run_dir: None


def train(cfg) -> dict:
    """Train to the end; the full weights (rank 0; {} on the others) and the logged steps (rank 0)."""
    with Trainer.from_config(cfg) as trainer:
        trainer.train()
        weights = full_state_dict(trainer.model)
    rows = read_metrics(trainer.run_dir) if trainer.env.is_main else []
    return {"weights": weights, "rows": [row for row in rows if "loss" in row]}


def _train_each(rank: int, world: int, configs: dict) -> dict:
    join_as_rank(rank, world)
    return {key: train(cfg) for key, cfg in configs.items()}


@pytest.mark.slow
def test_fsdp_trains_like_ddp_through_the_trainer(synthetic_root, tmp_path):
    """Slow: 6 short runs on 2 forked ranks (the first sharded run also warms the sharding's caches)."""
    configs = {}
    for loss in ("clip", "siglip", "llip"):  # composed once here, not on each rank
        overrides = [
            *TINY,
            *LOSSES.get(loss, ["loss=clip"]),
            "trainer.max_steps=5",
            "trainer.micro_batches=2",
        ]
        cfg = config(synthetic_root, tmp_path, *overrides, f"trainer.grad_clip={CLIP_AT}")
        for parallel in ("ddp", "fsdp"):
            configs[(loss, parallel)] = with_values(
                cfg, run_dir=tmp_path / f"{loss}-{parallel}", parallel=parallel
            )
    results = fork_ranks(_train_each, 2, tmp_path, configs, timeout_s=120)[0]
    for loss in ("clip", "siglip", "llip"):
        ddp, fsdp = results[(loss, "ddp")], results[(loss, "fsdp")]
        assert [r["step"] for r in fsdp["rows"]] == [r["step"] for r in ddp["rows"]] == [1, 2, 3, 4, 5]
        for name in ("loss", "grad_norm"):
            expected = [r[name] for r in ddp["rows"]]
            torch.testing.assert_close([r[name] for r in fsdp["rows"]], expected, rtol=1e-5, atol=0, msg=loss)
        assert min(r["grad_norm"] for r in ddp["rows"]) > CLIP_AT
        assert fsdp["weights"].keys() == ddp["weights"].keys()
        for key, value in ddp["weights"].items():
            torch.testing.assert_close(fsdp["weights"][key], value, rtol=1e-5, atol=1e-5, msg=f"{loss} {key}")


def with_values(cfg: DictConfig, *, run_dir: Path, **trainer: object) -> DictConfig:
    """A copy of a composed config in another run_dir, with `trainer.<key>` values changed."""
    cfg = copy.deepcopy(cfg)
    cfg.run_dir = str(run_dir)
    for key, value in trainer.items():
        cfg.trainer[key] = value
    return cfg
