"""Training on a GPU in bf16: each loss learns the synthetic task, and a run resumes where it stopped."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.runs import LOSSES, assert_learns, config, read_metrics, run_training

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GPU = ["trainer.device=cuda", "trainer.precision=bf16", "data.num_workers=3"]


@pytest.mark.parametrize("loss", ["clip", *sorted(LOSSES)])
def test_bf16_run_learns_with_each_loss(loss, synthetic_root, tmp_path):
    assert_learns(loss, synthetic_root, tmp_path, *GPU)


def test_bf16_run_resumes_from_its_checkpoint(synthetic_root, tmp_path):
    base = [*GPU, "trainer.checkpoint_every=5", "data.batch_size=16", "data.val_shards=null"]
    base += ["data.zeroshot_dir=null", "trainer.log_every=5"]
    run_training(config(synthetic_root, tmp_path, "trainer.max_steps=5", *base))
    run_training(config(synthetic_root, tmp_path, "trainer.max_steps=10", *base))
    assert [row["step"] for row in read_metrics(tmp_path)] == [5, 10]


@pytest.mark.parametrize("loss", ["clip", "llip"])
def test_bf16_micro_batches_match_the_whole_batch(loss, synthetic_root, tmp_path):
    """trainer.micro_batches on the GPU: the same first-step loss and nearly the same run."""
    common = [*GPU, *LOSSES.get(loss, []), "trainer.max_steps=3", "trainer.log_every=1"]
    common += ["data.batch_size=64", "data.val_shards=null", "data.zeroshot_dir=null"]
    run_training(config(synthetic_root, tmp_path / "whole", *common))
    run_training(config(synthetic_root, tmp_path / "micro", *common, "trainer.micro_batches=4"))
    whole, micro = (read_metrics(tmp_path / name) for name in ("whole", "micro"))
    assert [row["loss"] for row in micro] == pytest.approx([row["loss"] for row in whole], rel=2e-2)
