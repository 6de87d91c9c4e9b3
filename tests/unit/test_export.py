"""Exports load in open_clip with the same embeddings, preprocessing and tokens; every model round-trips."""

import json
import os
import shutil

import open_clip
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

import vlmtrain
from vlmtrain.checkpoint.export import export
from vlmtrain.checkpoint.load import open_pretrained
from vlmtrain.cli import export as export_cli

EMBED = 48
VISION = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
CAPTIONS = ["a photo of a red circle", "Two BLUE squares, at the top!", "a"]


def openclip_vision(**vision):
    return {
        "_target_": "vlmtrain.models.image_encoders.OpenClipVisionEncoder",
        "embed_dim": EMBED,
        "model_name": None,
        "vision_cfg": {**VISION, **vision},
        "pretrained_path": None,
    }


def openclip_text(**text):
    return {
        "_target_": "vlmtrain.models.text_encoders.OpenClipTextEncoder",
        "embed_dim": EMBED,
        "model_name": None,
        "text_cfg": {**TEXT, **text},
        "pretrained_path": None,
    }


def timm_vision(name, **kwargs):
    return {
        "_target_": "vlmtrain.models.image_encoders.TimmEncoder",
        "embed_dim": EMBED,
        "model_name": name,
        "image_size": 32,
        "model_kwargs": kwargs,
        "pretrained_path": None,
    }


def model_config(image=None, text=None, bias=None):
    return {
        "_target_": "vlmtrain.models.two_tower.TwoTower",
        "embed_dim": EMBED,
        "init_logit_scale": 2.5,
        "init_logit_bias": bias,
        "image_encoder": image or openclip_vision(),
        "text_encoder": text or openclip_text(),
    }


def save_checkpoint(path, config, seed=0):
    """A training checkpoint as the trainer writes it, with perturbed weights so nothing is at init."""
    torch.manual_seed(seed)
    model = instantiate(OmegaConf.create(config))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    state = {"model": model.state_dict(), "train_state": {"step": 7}, "config": {"model": config, "data": {}}}
    torch.save(state, path)
    return model.eval()


def embeddings(model, tokens, normalize=False):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kwargs = {"normalize": True} if normalize else {}
    with torch.no_grad():
        return model.encode_image(images, **kwargs), model.encode_text(tokens, **kwargs)


def assert_same_as_open_clip(model, folder):
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(CAPTIONS)
    assert torch.equal(tokens, model.text_encoder.tokenizer()(CAPTIONS))
    for ours, other in zip(embeddings(model, tokens), embeddings(theirs.eval(), tokens, normalize=True)):
        assert (ours - other).abs().max().item() < 1e-6
    assert theirs.logit_scale.item() == model.logit_scale.item()
    if model.logit_bias is None:
        assert theirs.logit_bias is None
    else:
        assert theirs.logit_bias.item() == model.logit_bias.item()
    return theirs, preprocess


@pytest.mark.parametrize("bias", [None, -10.0], ids=["clip", "siglip"])
def test_open_clip_loads_export_strictly_with_same_embeddings(tmp_path, bias):
    model = save_checkpoint(tmp_path / "ckpt.pt", model_config(bias=bias))
    result = export(tmp_path / "ckpt.pt", tmp_path / "out")
    assert result.format == "open_clip" and result.note is None
    umask = os.umask(0)
    os.umask(umask)
    weights = tmp_path / "out" / "open_clip_model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' owner-only default
    theirs, _ = assert_same_as_open_clip(model, tmp_path / "out")
    assert type(theirs) is open_clip.CLIP
    # open_clip's own layout: text tower at the top level, no key left over in either direction
    saved = load_file(str(tmp_path / "out" / "open_clip_model.safetensors"))
    assert set(saved) == set(theirs.state_dict()) and "token_embedding.weight" in saved
    cfg = json.loads((tmp_path / "out" / "open_clip_config.json").read_text())["model_cfg"]
    assert "custom_text" not in cfg and ("init_logit_bias" in cfg) == (bias is not None)


def test_text_tower_with_class_token_uses_custom_text_layout(tmp_path):
    # tokenizer_kwargs is ignored by vlmtrain's tokenizer, so the export must not hand it to open_clip's
    text = openclip_text(embed_cls=True, pool_type="last", tokenizer_kwargs={"clean": "canonicalize"})
    model = save_checkpoint(tmp_path / "ckpt.pt", model_config(text=text))
    export(tmp_path / "ckpt.pt", tmp_path / "out", fmt="open_clip")
    theirs, _ = assert_same_as_open_clip(model, tmp_path / "out")
    assert type(theirs) is open_clip.CustomTextCLIP and theirs.text.cls_emb is not None


def test_open_clip_preprocess_equals_eval_transform(tmp_path):
    save_checkpoint(tmp_path / "ckpt.pt", model_config())
    export(tmp_path / "ckpt.pt", tmp_path / "out")
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'out'}")
    loaded = vlmtrain.load_pretrained(tmp_path / "out")  # a named result that unpacks as before
    model, transform, tokenizer = loaded
    assert (loaded.model, loaded.transform, loaded.tokenizer) == (model, transform, tokenizer)
    pixels = torch.randint(0, 256, (45, 70, 3), generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.numpy().astype("uint8"))  # not square, not 32: resize and crop both act
    assert torch.equal(preprocess(image), transform(image))
    assert preprocess(image).shape == (3, 32, 32)


def test_timm_tower_without_kwargs_exports_through_timm_model_name(tmp_path):
    model = save_checkpoint(tmp_path / "ckpt.pt", model_config(image=timm_vision("resnet10t")))
    assert export(tmp_path / "ckpt.pt", tmp_path / "out").format == "open_clip"
    assert_same_as_open_clip(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["timm_model_name"] == "resnet10t"
    assert cfg["preprocess_cfg"]["mean"] == list(model.image_encoder.mean)  # timm's ImageNet statistics


def test_timm_tower_with_kwargs_is_refused_or_falls_back(tmp_path, capsys):
    image = timm_vision("vit_tiny_patch16_224", patch_size=8, depth=2)
    save_checkpoint(tmp_path / "ckpt.pt", model_config(image=image))
    with pytest.raises(SystemExit) as exit_info:
        export_cli([str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "oc"), "--format", "open_clip"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert (
        "open_clip format cannot express image tower TimmEncoder(vit_tiny_patch16_224) with model_kwargs"
        in error
    )
    assert error.endswith("use --format vlmtrain") and not (tmp_path / "oc").exists()

    export_cli([str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "auto")])
    out = capsys.readouterr().out
    assert "note: open_clip format cannot express" in out and "wrote vlmtrain format" in out
    assert sorted(p.name for p in (tmp_path / "auto").iterdir()) == [
        "model.safetensors",
        "vlmtrain_config.json",
    ]


def test_timm_vit_at_a_new_size_is_refused_naming_the_shape(tmp_path):
    save_checkpoint(tmp_path / "ckpt.pt", model_config(image=timm_vision("vit_tiny_patch16_224")))
    with pytest.raises(
        ValueError, match=r"TimmEncoder\(vit_tiny_patch16_224\): open_clip builds visual.trunk.pos_embed"
    ):
        export(tmp_path / "ckpt.pt", tmp_path / "out", fmt="open_clip")


@pytest.mark.parametrize("fmt", ["open_clip", "vlmtrain"])
def test_checkpoint_run_dir_and_export_load_the_same_model(tmp_path, fmt):
    config = model_config(bias=-5.0)
    model = save_checkpoint(tmp_path / "ckpt.pt", config)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "ckpt.pt", tmp_path / "run" / "checkpoints" / "step_00000007.pt")
    export(tmp_path / "run", tmp_path / "out", fmt=fmt)
    tokens = model.text_encoder.tokenizer()(CAPTIONS)
    expected = embeddings(model, tokens)
    for source in (tmp_path / "ckpt.pt", tmp_path / "run", tmp_path / "out"):
        loaded, transform, tokenizer = vlmtrain.load_pretrained(source)
        assert not loaded.training and torch.equal(tokenizer(CAPTIONS), tokens)
        for ours, other in zip(expected, embeddings(loaded, tokens)):
            assert torch.equal(ours, other), source
        assert loaded.logit_bias.item() == model.logit_bias.item()
    meta = json.loads((tmp_path / "out" / "vlmtrain_config.json").read_text())
    assert meta["step"] == 7 and meta["model"]["image_encoder"]["_target_"].endswith("OpenClipVisionEncoder")
    assert open_pretrained(tmp_path / "run").source.name == "step_00000007.pt"


def test_hf_text_tower_export_is_self_contained(tmp_path, tiny_bert):
    text = {
        "_target_": "vlmtrain.models.text_encoders.HFTextEncoder",
        "embed_dim": EMBED,
        "path": str(tiny_bert),
        "context_length": 8,
    }
    model = save_checkpoint(tmp_path / "ckpt.pt", model_config(text=text))
    with pytest.raises(ValueError, match="text tower HFTextEncoder"):
        export(tmp_path / "ckpt.pt", tmp_path / "oc", fmt="open_clip")
    result = export(tmp_path / "ckpt.pt", tmp_path / "out")
    assert result.format == "vlmtrain" and "HFTextEncoder" in result.note
    tokens = model.text_encoder.tokenizer()(CAPTIONS)
    expected = embeddings(model, tokens)

    shutil.rmtree(tiny_bert)  # the export must not need the original folder ...
    shutil.move(tmp_path / "out", tmp_path / "moved")  # ... nor its own original location
    meta = json.loads((tmp_path / "moved" / "vlmtrain_config.json").read_text())
    assert meta["model"]["text_encoder"]["path"] == "text_encoder"
    assert meta["model"]["image_encoder"]["pretrained_path"] is None
    loaded, _, tokenizer = vlmtrain.load_pretrained(tmp_path / "moved")
    assert torch.equal(tokenizer(CAPTIONS), tokens)
    for ours, other in zip(expected, embeddings(loaded, tokens)):
        assert torch.equal(ours, other)


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt.pt", model_config())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        export_cli([str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "out")])
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    export_cli([str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "out"), "--overwrite"])
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "out"]  # no staging folder left behind


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import vlmtrain.checkpoint.export as export_module

    save_checkpoint(tmp_path / "ckpt.pt", model_config())

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_save_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        export(tmp_path / "ckpt.pt", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_unknown_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint, run directory or export folder"):
        vlmtrain.load_pretrained(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints under"):
        vlmtrain.load_pretrained(tmp_path / "run")
