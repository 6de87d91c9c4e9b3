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


def train_locked(cfg) -> tuple[dict, dict, dict, dict]:
    """Train 3 steps; the towers' state dicts (buffers included) before and after. The optimizer holds
    exactly the parameters that train."""
    with Trainer.from_config(cfg) as trainer:
        model = trainer.model
        image_before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
        text_before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
        held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        assert held == {id(p) for p in model.parameters() if p.requires_grad}
        trainer.train()
        return image_before, model.image_encoder.state_dict(), text_before, model.text_encoder.state_dict()


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_locked_image_tower_stays_bit_identical(synthetic_root, tmp_path):
    cfg = config(synthetic_root, tmp_path, *SHORT, "model.image_encoder.locked=true")
    image_before, image_after, text_before, text_after = train_locked(cfg)
    assert not changed(image_before, image_after)
    assert changed(text_before, text_after)


TIMM_IN_OPEN_CLIP = [
    "++model.image_encoder.vision_cfg.timm_model_name=resnet18",
    "++model.image_encoder.vision_cfg.timm_pool=avg",
    "++model.image_encoder.vision_cfg.timm_proj=linear",
    "++model.image_encoder.vision_cfg.image_size=32",
    "model.image_encoder.locked=true",
]


@pytest.mark.slow
@pytest.mark.parametrize("unlocked", [0, 1])
def test_locked_open_clip_timm_tower_stays_bit_identical(synthetic_root, tmp_path, unlocked):
    """open_clip's TimmModel (a timm trunk in an open_clip tower), locked wholly or all but timm's last
    layer group: the locked trunk, BatchNorm statistics included, is bit-identical after training; its
    projection head and the text tower train."""
    cfg = config(
        synthetic_root,
        tmp_path,
        *SHORT,
        *TIMM_IN_OPEN_CLIP,
        f"model.image_encoder.unlocked_blocks={unlocked}",
    )
    image_before, image_after, text_before, text_after = train_locked(cfg)
    unlocked_prefix = ("tower.trunk.layer4.1.",) if unlocked else ()
    trained = {k for k in changed(image_before, image_after) if k != "tower.head.proj.weight"}
    assert "tower.head.proj.weight" in changed(image_before, image_after)
    assert all(k.startswith(unlocked_prefix) for k in trained) and bool(trained) == bool(unlocked)
    assert any("running_mean" in k for k in image_before if k.startswith("tower.trunk.layer4.0"))
    assert changed(text_before, text_after)


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
