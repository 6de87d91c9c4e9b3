"""Non-finite steps in a real run: skipped, counted in metrics.jsonl and the progress line, never
checkpointed, and too many in a row stop the run with one line."""

import logging

import pytest
import torch

from tests.helpers.runs import config, read_metrics, run_training
from vlmtrain.checkpoint.manager import read_checkpoint
from vlmtrain.train.step import NonFiniteError

COMMON = [
    "trainer.log_every=1",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.val_shards=null",
    "data.zeroshot_dir=null",
]


def test_a_run_that_only_skips_stops_after_max_skipped_steps(synthetic_root, tmp_path, caplog):
    """exp(1e4) overflows: every loss is non-finite, so every step is skipped and counted."""
    cfg = config(
        synthetic_root,
        tmp_path,
        *COMMON,
        "model.init_logit_scale=1e4",
        "trainer.max_steps=10",
        "trainer.checkpoint_every=2",
        "trainer.max_skipped_steps=3",
    )
    caplog.set_level(logging.INFO, logger="vlmtrain")
    with pytest.raises(NonFiniteError, match=r"^trainer.max_skipped_steps: 3 steps in a row") as error:
        run_training(cfg)
    assert "\n" not in str(error.value)
    rows = [row for row in read_metrics(tmp_path) if "loss" in row]
    assert [(r["step"], r["skipped"], r["skipped_steps"]) for r in rows] == [(1, 1, 1), (2, 1, 2), (3, 1, 3)]
    assert "skipped 3" in caplog.text
    saved = read_checkpoint(tmp_path / "checkpoints" / "step_00000002.pt")  # skipped steps change nothing
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_weights_that_became_non_finite_are_never_checkpointed(synthetic_root, tmp_path):
    """optim.lr=1e300: the first step's loss and gradients are finite, the weights it leaves are not."""
    overrides = ["optim.lr=1e300", "schedule=constant", "trainer.max_steps=4", "trainer.checkpoint_every=1"]
    cfg = config(synthetic_root, tmp_path, *COMMON, *overrides)
    with pytest.raises(NonFiniteError, match="^weights are not finite at step 1, not checkpointed") as error:
        run_training(cfg)
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "checkpoints").glob("step_*.pt"))
    for path in (tmp_path / "checkpoints").glob("step_*.pt"):
        assert all(torch.isfinite(v).all() for v in read_checkpoint(path)["model"].values())
