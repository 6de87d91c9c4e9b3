"""Llip against the paper's equations, written per (image, caption) pair from the raw parameters:

tokens  the K mixture tokens' final states (they replace the class token: K + P positions)
k_m = LN(tokens_m W_k,m)   v_m = LN(tokens_m W_v,m)   (one projection per token; LN only with qkv_norm)
h = the text tower's pooled state   q = LN(h W_q)   y = h P (the tower's own projection)
z = [sum_m softmax_m(k_m,head . q_head / tau) v_m,head]_heads O
logit = exp(s) cos(z, y) + b,   loss = -1/B sum log sigmoid(+-logit)
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.tiny import TEXT, VISION
from vlmtrain.losses.llip import LlipLoss
from vlmtrain.models.image_encoders import OpenClipVisionEncoder
from vlmtrain.models.llip_model import LlipModel
from vlmtrain.models.text_encoders import OpenClipTextEncoder

E, K, HEADS = 32, 4, 2


PUBLISHED = {"query_from": "pooled", "init_logit_scale": math.log(1 / 0.07), "init_logit_bias": -10.0}


def model(qkv_norm=False, query_from="pooled", layout="replace_class") -> LlipModel:
    """The published parameterisation, selected explicitly (the model config's defaults may differ)."""
    torch.manual_seed(0)
    image = OpenClipVisionEncoder(E, vision_cfg=VISION, mixture_tokens=K, mixture_layout=layout)
    text = OpenClipTextEncoder(E, text_cfg=TEXT)
    fields = {**PUBLISHED, "query_from": query_from}
    llip = LlipModel(image, text, E, num_heads=HEADS, qkv_norm=qkv_norm, **fields)
    if qkv_norm:  # move the norms off their identity init, so that the test sees them
        for norm in (llip.head.key_norm, llip.head.value_norm, llip.head.query_norm):
            torch.nn.init.normal_(norm.weight, 1.0, 0.3), torch.nn.init.normal_(norm.bias, 0.0, 0.3)
    return llip


def batch(n=3):
    torch.manual_seed(1)
    tokens = OpenClipTextEncoder(8, text_cfg=TEXT).tokenizer()([f"a caption number {i}" for i in range(n)])
    return torch.randn(n, 3, 32, 32), tokens


def pooled_text(llip: LlipModel, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h from open_clip's own text tower with its projection removed; y = h P from the tower as it is."""
    bare = copy.deepcopy(llip.text_encoder.tower)
    bare.text_projection = None
    return bare(tokens), llip.text_encoder.tower(tokens)


def reference_logits(llip: LlipModel, images, tokens, qkv_norm: bool) -> torch.Tensor:
    head, tau = llip.head, llip.head.temperature
    ln = (lambda x, norm: norm(x)) if qkv_norm else (lambda x, norm: x)
    tokens_out = llip.image_encoder(images)  # (B, K, width); the tower layout is tested below
    h, y = pooled_text(llip, tokens)
    logits = torch.empty(len(images), len(tokens))
    for i in range(len(images)):
        k = ln(torch.stack([tokens_out[i, m] @ head.key_proj[m] for m in range(K)]), head.key_norm)
        v = ln(torch.stack([tokens_out[i, m] @ head.value_proj[m] for m in range(K)]), head.value_norm)
        for j in range(len(tokens)):
            q = ln(h[j] @ head.query_proj, head.query_norm)
            parts = []
            for hh in range(HEADS):
                cut = slice(hh * E // HEADS, (hh + 1) * E // HEADS)
                weights = torch.softmax(k[:, cut] @ q[cut] / tau, dim=0)
                parts.append(weights @ v[:, cut])
            z = torch.cat(parts) @ head.out_proj
            logits[i, j] = llip.logit_scale.exp() * F.cosine_similarity(z, y[j], dim=0) + llip.logit_bias
    return logits


@pytest.mark.parametrize("qkv_norm", [False, True])
def test_loss_and_similarity_follow_the_published_equations(qkv_norm):
    llip, (images, tokens) = model(qkv_norm), batch()
    with torch.no_grad():
        logits = reference_logits(llip, images, tokens, qkv_norm)
        signs = 2 * torch.eye(3) - 1
        expected = -F.logsigmoid(signs * logits).sum() / 3
        ours = LlipLoss(chunk_size=2)(**llip(images, tokens))
        assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
        scores = llip.similarity(llip.encode_image(images), llip.encode_text(tokens))
        cosines = (logits - llip.logit_bias) / llip.logit_scale.exp()
        torch.testing.assert_close(scores, cosines, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", ["b32", "b16", "l14", "h14", "bigg14"])
def test_the_presets_select_the_published_parameterisation(size):
    from tests.helpers.runs import compose_train

    cfg = compose_train([f"preset=llip_vit_{size}"]).model
    assert (cfg.query_from, cfg.image_encoder.mixture_layout) == ("pooled", "replace_class")
    assert cfg.init_logit_scale == pytest.approx(math.log(1 / 0.07)) and cfg.init_logit_bias == -10


def test_published_parameterisation():
    llip = model()
    assert llip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert llip.logit_bias.item() == -10 and llip.head.temperature == 5
    assert llip.head.query_proj.shape == (TEXT["width"], E)  # from the pooled state, not the embedding
    tower = llip.image_encoder.tower
    patches = (VISION["image_size"] // VISION["patch_size"]) ** 2
    assert tower.class_embedding.shape == (K, VISION["width"]) and tower.proj is None
    assert tower.positional_embedding.shape == (K + patches, VISION["width"])  # K + P tokens


def test_one_mixture_token_is_clips_class_token():
    """With K=1 the published layout is CLIP's: the token's state is open_clip's pooled output."""
    torch.manual_seed(0)
    encoder = OpenClipVisionEncoder(E, vision_cfg=VISION, mixture_tokens=1)
    tower = copy.deepcopy(encoder.tower)
    tower.class_embedding = torch.nn.Parameter(tower.class_embedding[0])
    images = batch()[0]
    with torch.no_grad():
        torch.testing.assert_close(encoder(images)[:, 0], tower(images))


def test_the_earlier_variant_stays_selectable():
    llip = model(query_from="embedding", layout="append")
    images, tokens = batch()
    assert llip.head.query_proj.shape == (E, E) and llip.image_encoder.tower.class_embedding.dim() == 1
    out = llip(images, tokens)
    with torch.no_grad():
        y = F.normalize(llip.text_encoder(tokens), dim=-1)
        torch.testing.assert_close(out["text_features"], y)
    with pytest.raises(ValueError, match="model.query_from"):
        model(query_from="caption")
