"""Every published model preset builds on the meta device with the parameter count of its reference:
open_clip's model configs for CLIP and SigLIP, and for Llip the same CLIP towers changed as the Llip
authors' model does (K class tokens with positions, no image projection, per-token key/value
projections, a query projection from the text width, an output projection, optional q/k/v norms).
The B/32 presets also take one real optimisation step on the CPU; the B/16 ones differ from them only
in their towers' open_clip names."""

import open_clip
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from open_clip.model import CLIP, CustomTextCLIP

from tests.helpers.runs import compose_train, options

SIZES = {"b32": "ViT-B-32", "b16": "ViT-B-16", "l14": "ViT-L-14", "h14": "ViT-H-14", "bigg14": "ViT-bigG-14"}
PRESETS = options("preset")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(preset: str, *overrides: str) -> tuple[torch.nn.Module, object]:
    cfg = compose_train([f"preset={preset}", *overrides])
    with torch.device("meta"):
        return instantiate(cfg.model), cfg


def open_clip_count(name: str, **changes) -> int:
    cfg = {**open_clip.get_model_config(name), **changes}
    kind = CustomTextCLIP if cfg.pop("custom_text", False) else CLIP
    with torch.device("meta"):
        return count(kind(**cfg))


def llip_count(name: str, k: int = 64, qkv_norm: bool = False) -> int:
    cfg = open_clip.get_model_config(name)
    embed, vision, text = cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]
    width, patches = vision["width"], (vision["image_size"] // vision["patch_size"]) ** 2
    tokens = (k - 1) * width + (k - 1) * width  # K class tokens and their K positions instead of one
    head = 2 * k * width * embed + text["width"] * embed + embed * embed + (6 * embed if qkv_norm else 0)
    del patches  # the P patch positions are CLIP's own
    return open_clip_count(name) - width * embed + tokens + head + 1  # + the logit bias


def test_every_family_and_size_has_a_preset():
    expected = {f"{family}_vit_{size}" for family in ("clip", "siglip", "llip") for size in SIZES}
    assert expected | {"siglip_released_b16"} == set(PRESETS)


@pytest.mark.parametrize("size", SIZES)
def test_clip_and_siglip_presets_count_as_open_clip(size):
    name = SIZES[size]
    clip, cfg = build(f"clip_vit_{size}")
    assert count(clip) == open_clip_count(name) and cfg.loss._target_.endswith("ClipLoss")
    siglip, cfg = build(f"siglip_vit_{size}")
    assert count(siglip) == open_clip_count(name, quick_gelu=True, init_logit_bias=-10)
    assert cfg.loss._target_.endswith("SigLipLoss") and siglip.logit_bias is not None


@pytest.mark.parametrize("size", SIZES)
def test_llip_presets_count_as_the_authors_model(size):
    llip, cfg = build(f"llip_vit_{size}")
    norm = size in ("h14", "bigg14")
    assert count(llip) == llip_count(SIZES[size], qkv_norm=norm)
    assert (llip.head.temperature, llip.head.num_tokens, llip.head.num_heads) == (
        1.0 if size == "l14" else 5.0,
        64,
        8,
    )
    assert isinstance(llip.head.key_norm, torch.nn.LayerNorm) == norm
    act = llip.image_encoder.tower.transformer.resblocks[0].mlp.gelu
    assert type(act).__name__ == "QuickGELU" and cfg.model.text_encoder.context_length == 77


def test_siglip_as_released_takes_its_tokenizer_from_a_local_folder_and_cleans_as_open_clip(tiny_bert):
    model, _ = build("siglip_released_b16", f"model.text_encoder.tokenizer_path={tiny_bert}")
    assert count(model) == open_clip_count("ViT-B-16-SigLIP")
    tokens = model.text_encoder.tokenizer()(["a red circle"])
    assert tokens.shape == (1, 64)
    # open_clip's SigLIP tokenizers canonicalize captions (lower case, punctuation out, one space)
    from open_clip.tokenizer import HFTokenizer as OpenClipHFTokenizer

    captions = ["A  Red, CIRCLE!  at_the top.", "the &amp; blue square", "  a\tred\n\ncircle  "]
    ours = model.text_encoder.tokenizer()(captions)
    theirs = OpenClipHFTokenizer(str(tiny_bert), context_length=64, clean="canonicalize")(captions)
    assert model.text_encoder.tokenizer_clean == "canonicalize"
    assert torch.equal(ours, theirs)
    raw = OpenClipHFTokenizer(str(tiny_bert), context_length=64, clean="whitespace")(captions)
    assert not torch.equal(ours, raw)  # the punctuation would be tokens of their own


@pytest.mark.parametrize("family", ["clip", "siglip", "llip"])
def test_the_b16_presets_are_the_b32_ones_with_b16_towers(family):
    """So the B/32 presets' CPU step below stands for the B/16 ones (whose sizes are counted above)."""
    b16, b32 = (
        OmegaConf.to_container(compose_train([f"preset={family}_vit_{size}"])) for size in ("b16", "b32")
    )
    for cfg in (b16, b32):
        for tower in ("image_encoder", "text_encoder"):
            cfg["model"][tower].pop("model_name")
    assert b16 == b32


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["clip_vit_b32", "siglip_vit_b32", "llip_vit_b32"])
def test_base_presets_take_a_cpu_step(preset):
    cfg = compose_train([f"preset={preset}", "model.image_encoder.grad_checkpointing=false"])
    torch.manual_seed(0)
    model, loss_fn = instantiate(cfg.model), instantiate(cfg.loss)
    images = torch.randn(2, 3, 224, 224)
    tokens = model.text_encoder.tokenizer()(["a photo of a cat", "a diagram of a bridge"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.text_encoder.tower.token_embedding.weight.detach().clone()
    loss = loss_fn(**model(images, tokens))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.text_encoder.tower.token_embedding.weight)
