"""Each loss trains the small model on the synthetic task to well above chance zero-shot accuracy."""

import pytest

from tests.integration.test_train import config, read_metrics
from vlmtrain.cli import run_training

# The sigmoid losses start with the bias near -log(batch size), where the all-negative optimum lies; the
# paper's -10 suits 32k batches and would spend these short runs moving the bias.
LOSSES = {
    "siglip": ["loss=siglip", "model.init_logit_bias=-4"],
    "llip": [
        "loss=llip",
        "model.init_logit_bias=-4",
        "model.image_encoder.mixture_tokens=8",
        "model.num_heads=4",
    ],
}


def assert_learns(loss: str, synthetic_root, run_dir, *overrides: str) -> None:
    """300 steps with `loss` (clip, siglip or llip): the loss falls and zero-shot beats 3x chance."""
    cfg = config(
        synthetic_root,
        run_dir,
        *LOSSES.get(loss, []),
        "trainer.max_steps=300",
        "trainer.log_every=10",
        "data.batch_size=64",
        "optim.lr=2e-3",
        "schedule.warmup_steps=20",
        *overrides,
    )
    results = run_training(cfg)
    losses = [row["loss"] for row in read_metrics(run_dir) if "loss" in row]
    assert losses[-1] < losses[0] - 0.5, losses
    assert results["zeroshot/acc1"] > 3 / results["zeroshot/num_classes"], results


@pytest.mark.slow
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_short_run_learns_with_each_loss(loss, synthetic_root, tmp_path):
    assert_learns(loss, synthetic_root, tmp_path, "data.num_workers=1")
