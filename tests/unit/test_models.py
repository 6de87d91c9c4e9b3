import open_clip
import pytest
import torch

from tests.helpers.tiny import TEXT, VISION
from vlmtrain.models.image_encoders import OpenClipVisionEncoder, TimmEncoder
from vlmtrain.models.text_encoders import HFTextEncoder, OpenClipTextEncoder
from vlmtrain.models.two_tower import TwoTower


def tiny_model(image_encoder=None, text_encoder=None) -> TwoTower:
    return TwoTower(
        image_encoder or OpenClipVisionEncoder(48, vision_cfg=VISION),
        text_encoder or OpenClipTextEncoder(48, text_cfg=TEXT),
        embed_dim=48,
    )


def test_openclip_towers_forward_shapes_and_normalised_features():
    model = tiny_model()
    tokens = model.text_encoder.tokenizer()(["a red circle", "a blue square at the top"])
    out = model(torch.randn(2, 3, 32, 32), tokens)
    assert tokens.shape == (2, 16)
    assert out["image_features"].shape == (2, 48) and out["text_features"].shape == (2, 48)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(2))
    assert out["logit_scale"].item() == pytest.approx(2.6592, abs=1e-3)
    assert "logit_bias" not in out


def test_openclip_preset_name_with_overrides():
    encoder = OpenClipVisionEncoder(
        32, model_name="ViT-B-32", vision_cfg={"layers": 1, "width": 64, "image_size": 64}
    )
    assert encoder.vision_cfg["patch_size"] == 32 and encoder.image_size == 64
    assert encoder(torch.randn(1, 3, 64, 64)).shape == (1, 32)


@pytest.mark.parametrize(
    "name,kwargs",
    [("vit_tiny_patch16_224", {"patch_size": 8, "depth": 2}), ("resnet18", {}), ("convnext_atto", {})],
)
def test_timm_encoder_forward_shapes(name, kwargs):
    encoder = TimmEncoder(48, name, image_size=32, model_kwargs=kwargs)
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 48)
    assert len(encoder.mean) == 3


def test_two_tower_with_bias_for_sigmoid_losses():
    model = TwoTower(
        OpenClipVisionEncoder(48, vision_cfg=VISION), OpenClipTextEncoder(48, text_cfg=TEXT), 48, 2.3, -10.0
    )
    out = model(torch.randn(1, 3, 32, 32), torch.zeros(1, 16, dtype=torch.long))
    assert out["logit_bias"].item() == -10.0


def test_pretrained_path_loads_local_weights(tmp_path):
    source = TimmEncoder(
        16, "vit_tiny_patch16_224", image_size=32, model_kwargs={"patch_size": 8, "depth": 1}
    )
    torch.save(source.trunk.state_dict(), tmp_path / "trunk.pt")
    loaded = TimmEncoder(
        16,
        "vit_tiny_patch16_224",
        image_size=32,
        model_kwargs={"patch_size": 8, "depth": 1},
        pretrained_path=str(tmp_path / "trunk.pt"),
    )
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(source.trunk(images), loaded.trunk(images))

    tower = OpenClipVisionEncoder(16, vision_cfg=VISION)
    from safetensors.torch import save_file

    save_file(tower.tower.state_dict(), str(tmp_path / "tower.safetensors"))
    again = OpenClipVisionEncoder(16, vision_cfg=VISION, pretrained_path=str(tmp_path / "tower.safetensors"))
    assert torch.equal(tower(images), again(images))


def test_missing_pretrained_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained_path: no such file"):
        OpenClipTextEncoder(16, text_cfg=TEXT, pretrained_path=str(tmp_path / "none.pt"))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_hf_text_encoder_from_local_directory(tiny_bert, pooling):
    encoder = HFTextEncoder(48, str(tiny_bert), context_length=8, pooling=pooling)
    tokens = encoder.tokenizer()(["a red circle", "a blue square at the top"])
    assert tokens.shape == (2, 8) and tokens[0, 0].item() == 2  # [CLS]
    assert encoder(tokens).shape == (2, 48)
    # padding must not change a caption's embedding
    longer = HFTextEncoder(48, str(tiny_bert), context_length=12, pooling=pooling)
    longer.load_state_dict(encoder.state_dict())
    assert torch.allclose(encoder(tokens[:1]), longer(longer.tokenizer()(["a red circle"])), atol=1e-5)


def test_hf_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.text_encoder.path"):
        HFTextEncoder(16, str(tmp_path / "missing"))


def test_the_open_clip_tokenizer_is_read_once_per_context_length():
    """Built once per process for each length (the Trainer, evaluation and loading each ask for it), and
    each tokenizes to its own length as open_clip's does."""

    def tokenizer(length: int):
        return OpenClipTextEncoder(embed_dim=16, text_cfg={**TEXT, "context_length": length}).tokenizer()

    short, long = tokenizer(8), tokenizer(12)
    assert tokenizer(8) is short
    captions = ["a photo of a red circle", "two blue squares on a long striped table"]
    for tokenizer, length in ((short, 8), (long, 12)):
        assert torch.equal(tokenizer(captions), open_clip.SimpleTokenizer(context_length=length)(captions))
