"""Locked towers (LiT): what trains and what does not, for each kind of tower."""

import pytest
import torch

from tests.helpers.tiny import TEXT, VISION
from vlmtrain.models.image_encoders import OpenClipVisionEncoder, TimmEncoder
from vlmtrain.models.text_encoders import HFTextEncoder, OpenClipTextEncoder


def trainable(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def test_open_clip_towers_lock_wholly_or_all_but_the_last_blocks():
    assert not trainable(OpenClipVisionEncoder(16, vision_cfg=VISION, locked=True))
    assert not trainable(OpenClipTextEncoder(16, text_cfg=TEXT, locked=True))
    image = OpenClipVisionEncoder(16, vision_cfg=VISION, locked=True, unlocked_blocks=1)
    names = trainable(image)
    assert names and all(
        n.startswith(("tower.transformer.resblocks.1.", "tower.ln_post", "tower.proj")) for n in names
    )
    assert "tower.ln_post.weight" in names and "tower.proj" in names  # the block's norms train with it
    text = OpenClipTextEncoder(16, text_cfg=TEXT, locked=True, unlocked_blocks=2)
    assert {n for n in trainable(text) if "resblocks" in n} == {
        n for n, _ in text.named_parameters() if "resblocks" in n
    }
    assert "tower.token_embedding.weight" not in trainable(text)


def test_llip_mixture_tokens_lock_with_their_tower():
    encoder = OpenClipVisionEncoder(16, vision_cfg=VISION, mixture_tokens=4, locked=True)
    assert not trainable(encoder)


def test_hf_tower_keeps_its_layer_norms_frozen(tiny_bert):
    encoder = HFTextEncoder(16, str(tiny_bert), locked=True, unlocked_blocks=1)
    names = trainable(encoder)
    assert any("encoder.layer.0.attention" in n for n in names)
    assert not any("LayerNorm" in n or "embeddings" in n for n in names)
    assert {"proj.weight"} <= names  # the projection head is new, so it trains (as in open_clip)


def test_timm_tower_freezes_the_statistics_of_its_frozen_groups():
    encoder = TimmEncoder(16, "resnet18", image_size=32, locked=True, unlocked_blocks=1)
    frozen_bn = [m for m in encoder.trunk.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    assert frozen_bn and any(n.startswith("trunk.layer4") for n in trainable(encoder))
    assert not any(n.startswith(("trunk.conv1", "trunk.layer1")) for n in trainable(encoder))
    whole = TimmEncoder(16, "resnet18", image_size=32, locked=True)
    assert not trainable(whole)


TIMM_IN_OPEN_CLIP = {
    "timm_model_name": "resnet18",
    "timm_pool": "avg",
    "timm_proj": "linear",
    "image_size": 32,
}


def test_open_clip_tower_wrapping_timm_locks_its_trunk_wholly_or_all_but_the_last_groups():
    """open_clip's TimmModel: the trunk locks (BatchNorm statistics of the frozen groups too), the head
    it adds (pooling projection) trains, as open_clip's lock_image_tower does."""
    whole = OpenClipVisionEncoder(16, vision_cfg=TIMM_IN_OPEN_CLIP, locked=True)
    assert type(whole.tower).__name__ == "TimmModel"
    assert trainable(whole) == {"tower.head.proj.weight"}
    partly = OpenClipVisionEncoder(16, vision_cfg=TIMM_IN_OPEN_CLIP, locked=True, unlocked_blocks=1)
    names = trainable(partly) - trainable(whole)
    assert names and all(n.startswith("tower.trunk.layer4.1.") for n in names)  # timm's last group
    frozen_bn = {n for n, m in partly.named_modules() if type(m).__name__ == "FrozenBatchNorm2d"}
    assert "tower.trunk.layer4.0.bn1" in frozen_bn and "tower.trunk.layer4.1.bn1" not in frozen_bn
    with pytest.raises(ValueError, match="model.image_encoder.unlocked_blocks: expected 0..9"):
        OpenClipVisionEncoder(16, vision_cfg=TIMM_IN_OPEN_CLIP, locked=True, unlocked_blocks=10)


def test_lock_fields_are_checked():
    with pytest.raises(ValueError, match="model.image_encoder.unlocked_blocks"):
        OpenClipVisionEncoder(16, vision_cfg=VISION, locked=True, unlocked_blocks=5)
    with pytest.raises(ValueError, match="model.text_encoder.unlocked_blocks"):
        OpenClipTextEncoder(16, text_cfg=TEXT, unlocked_blocks=1)
