"""Towers start from local weight files the test writes: an open_clip training checkpoint (DDP prefixes
and all), a timm checkpoint with its classifier, a Hugging Face model folder."""

import open_clip
import pytest
import torch
from open_clip.model import CLIP

from tests.helpers.tiny import TEXT, VISION
from vlmtrain.models.image_encoders import OpenClipVisionEncoder, TimmEncoder
from vlmtrain.models.text_encoders import HFTextEncoder, OpenClipTextEncoder

E = 16


@pytest.fixture
def open_clip_checkpoint(tmp_path):
    """A CLIP model and the checkpoint open_clip's trainer would write for it (inside DDP)."""
    torch.manual_seed(3)
    model = CLIP(E, VISION, TEXT).eval()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "run", "state_dict": state}, path)
    return model, path


def test_both_towers_from_an_open_clip_checkpoint(open_clip_checkpoint):
    model, path = open_clip_checkpoint
    image = OpenClipVisionEncoder(E, vision_cfg=VISION, pretrained_path=str(path)).eval()
    text = OpenClipTextEncoder(E, text_cfg=TEXT, pretrained_path=str(path)).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = open_clip.tokenize(["a red circle", "two blue squares"], context_length=16)
    with torch.no_grad():
        assert torch.equal(image(images), model.encode_image(images))
        assert torch.equal(text(tokens), model.encode_text(tokens))


def test_llip_image_tower_starts_from_clip_weights(open_clip_checkpoint):
    model, path = open_clip_checkpoint
    encoder = OpenClipVisionEncoder(E, vision_cfg=VISION, pretrained_path=str(path), mixture_tokens=4)
    for mine, theirs in zip(encoder.tower.transformer.parameters(), model.visual.transformer.parameters()):
        assert torch.equal(mine, theirs)
    assert encoder.tower.class_embedding.shape == (4, VISION["width"])


def test_timm_checkpoint_with_its_classifier(tmp_path):
    kwargs = {"patch_size": 8, "depth": 1}
    source = TimmEncoder(E, "vit_tiny_patch16_224", image_size=32, model_kwargs=kwargs)
    import timm

    full = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, **kwargs)
    full.load_state_dict(source.trunk.state_dict(), strict=False)
    torch.save({"state_dict": full.state_dict()}, tmp_path / "timm.pth")
    loaded = TimmEncoder(
        E,
        "vit_tiny_patch16_224",
        image_size=32,
        model_kwargs=kwargs,
        pretrained_path=str(tmp_path / "timm.pth"),
    )
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(
        loaded.trunk(images), full.forward_head(full.forward_features(images), pre_logits=True)
    )


def test_hugging_face_folder_weights(tiny_bert):
    from transformers import BertModel

    encoder = HFTextEncoder(E, str(tiny_bert))
    saved = BertModel.from_pretrained(tiny_bert)
    for (name, mine), theirs in zip(encoder.transformer.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_a_file_for_another_tower_is_one_line(open_clip_checkpoint):
    _, path = open_clip_checkpoint
    with pytest.raises(ValueError, match="pretrained_path: .* does not fit the tower") as error:
        OpenClipVisionEncoder(E, vision_cfg={**VISION, "width": 32}, pretrained_path=str(path))
    assert "\n" not in str(error.value)
