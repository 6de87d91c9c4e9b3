"""Training with the towers' run options: LiT (a locked image tower), activation checkpointing, compile."""

import pytest
import torch

from tests.helpers.runs import LOSSES, config, read_metrics, run_training
from vlmtrain.train.trainer import Trainer

SHORT = [
    "trainer.max_steps=3",
    "trainer.log_every=1",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.val_shards=null",
    "data.zeroshot_dir=null",
]


def losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir) if "loss" in row]


def test_locked_image_tower_stays_bit_identical(synthetic_root, tmp_path):
    cfg = config(synthetic_root, tmp_path, *SHORT, "model.image_encoder.locked=true")
    with Trainer.from_config(cfg) as trainer:
        model = trainer.model
        image_before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
        text_before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
        held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        assert held == {id(p) for p in model.parameters() if p.requires_grad}
        assert not held & {id(p) for p in model.image_encoder.parameters()}
        trainer.train()
        image_after, text_after = model.image_encoder.state_dict(), model.text_encoder.state_dict()
    assert all(torch.equal(image_before[k], image_after[k]) for k in image_before)
    assert any(not torch.equal(text_before[k], text_after[k]) for k in text_before)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["clip", "llip"])
def test_activation_checkpointing_gives_identical_losses(loss, synthetic_root, tmp_path):
    runs = {}
    for on in (False, True):
        flag = str(on).lower()
        overrides = [
            f"model.image_encoder.grad_checkpointing={flag}",
            f"model.text_encoder.grad_checkpointing={flag}",
        ]
        run_training(config(synthetic_root, tmp_path / flag, *SHORT, *LOSSES.get(loss, []), *overrides))
        runs[on] = losses(tmp_path / flag)
    assert len(runs[True]) == 3 and runs[True] == runs[False]


@pytest.mark.slow
def test_compiled_towers_give_the_same_losses(synthetic_root, tmp_path):
    runs = {}
    for on in (False, True):
        flag = str(on).lower()
        run_training(config(synthetic_root, tmp_path / flag, *SHORT, f"trainer.compile={flag}"))
        runs[on] = losses(tmp_path / flag)
    assert len(runs[True]) == 3
    for compiled, eager in zip(runs[True], runs[False], strict=True):
        assert compiled == pytest.approx(eager, rel=1e-4)
