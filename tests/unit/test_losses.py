"""The losses and the Llip head against naive dense references and open_clip (single process, float64).

Multi-process exactness is in tests/integration/test_distributed_losses.py.
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.tiny import oc
from vlmtrain.losses import ClipLoss, LlipLoss, SigLipLoss
from vlmtrain.models.llip_head import LlipHead

F64 = torch.float64
D, K, H, VISION_W, TEXT_W = 12, 4, 3, 10, 7


# ---- naive dense references -------------------------------------------------------------------------


def ref_clip(image, text, logit_scale):
    logits = logit_scale.exp() * image @ text.T
    rows = logits - logits.logsumexp(dim=1, keepdim=True)
    cols = logits - logits.logsumexp(dim=0, keepdim=True)
    return -(rows.diagonal().mean() + cols.diagonal().mean()) / 2


def ref_sigmoid(logits):
    z = 2 * torch.eye(logits.shape[0], dtype=logits.dtype) - 1
    return -torch.log(torch.sigmoid(z * logits)).sum() / logits.shape[0]


def ref_siglip(image, text, logit_scale, logit_bias):
    logits = logit_scale.exp() * image @ text.T
    return ref_sigmoid(logits if logit_bias is None else logits + logit_bias)


def ref_keys_values(head, tokens):
    """Token k of every image through its own projection, split into heads: (B, H, K, d) each."""
    per_token = head.key_proj.dim() == 3
    out = []
    for proj in (head.key_proj, head.value_proj):
        cols = [tokens[:, k] @ (proj[k] if per_token else proj) for k in range(tokens.shape[1])]
        out.append(torch.stack(cols, dim=1).unflatten(-1, (H, -1)).transpose(1, 2))
    return out


def ref_mix(keys, values, queries, out_proj, tau):
    """(B_i, B_t, E) by broadcasting: image i, caption j, head h, token k."""
    scores = (keys[:, None] * queries[None, :, :, None, :]).sum(-1) / tau  # (i, j, h, k)
    weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
    mixed = (weights[..., None] * values[:, None]).sum(-2)  # (i, j, h, d)
    projected = mixed.flatten(2) @ out_proj
    return projected / projected.norm(dim=-1, keepdim=True)


def ref_llip(head, tokens, pooled, text, logit_scale, logit_bias):
    keys, values = ref_keys_values(head, tokens)
    queries = (pooled @ head.query_proj).unflatten(-1, (H, -1))
    mixed = ref_mix(keys, values, queries, head.out_proj, head.temperature)
    logits = logit_scale.exp() * (mixed * text[None]).sum(-1)
    return ref_sigmoid(logits if logit_bias is None else logits + logit_bias)


# ---- helpers -----------------------------------------------------------------------------------------


def _features(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    image, text = F.normalize(torch.randn(2, batch, D, generator=g, dtype=F64), dim=-1)
    return image.requires_grad_(), text.requires_grad_()


def _scalar(value):
    return torch.tensor(value, dtype=F64, requires_grad=True)


def _assert_same(ours, theirs, inputs):
    """Same value and the same gradient with respect to every input."""
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)
    ours_grads = torch.autograd.grad(ours, inputs, allow_unused=True, retain_graph=True)
    theirs_grads = torch.autograd.grad(theirs, inputs, allow_unused=True)
    for i, (a, b) in enumerate(zip(ours_grads, theirs_grads)):
        a = torch.zeros_like(inputs[i]) if a is None else a
        b = torch.zeros_like(inputs[i]) if b is None else b
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=lambda m, i=i: f"gradient of input {i}: {m}")


# ---- CLIP --------------------------------------------------------------------------------------------


CLIP_VARIANTS = [
    dict(local_loss=True),
    dict(local_loss=False),
    dict(local_loss=False, gather_with_grad=False),
]


@pytest.mark.parametrize("batch", [1, 5, 16])
@pytest.mark.parametrize("variant", CLIP_VARIANTS, ids=["local", "full", "full-nograd"])
def test_clip_matches_dense_reference(batch, variant):
    image, text = _features(batch)
    scale, bias = _scalar(math.log(1 / 0.07)), _scalar(-3.0)
    ours = ClipLoss(**variant)(image, text, scale, bias)
    _assert_same(ours, ref_clip(image, text, scale), [image, text, scale, bias])


@pytest.mark.parametrize("batch", [2, 9])
@pytest.mark.parametrize("local_loss", [True, False])
def test_clip_matches_open_clip(batch, local_loss):
    image, text = _features(batch, seed=1)
    scale = _scalar(2.5)
    theirs = oc.ClipLoss(local_loss=local_loss, gather_with_grad=True)(image, text, scale.exp())
    _assert_same(ClipLoss(local_loss=local_loss)(image, text, scale), theirs, [image, text, scale])


def test_clip_refuses_local_loss_without_gradient_gather():
    with pytest.raises(ValueError, match="gather_with_grad"):
        ClipLoss(local_loss=True, gather_with_grad=False)


# ---- SigLIP ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 6, 8])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 100])
@pytest.mark.parametrize("with_bias", [True, False])
def test_siglip_matches_dense_reference(batch, chunk_size, with_bias):
    image, text = _features(batch)
    scale, bias = _scalar(math.log(10)), _scalar(-10.0) if with_bias else None
    ours = SigLipLoss(chunk_size=chunk_size)(image, text, scale, bias)
    inputs = [image, text, scale] + ([bias] if with_bias else [])
    _assert_same(ours, ref_siglip(image, text, scale, bias), inputs)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 4, 7, 100])
def test_siglip_chunks_spanning_remote_blocks_match_dense_reference(chunk_size):
    """One rank's 4 images against its 4 captions and 3 other ranks' blocks, as the ring hands them over:
    chunks of every size, including ones that straddle blocks."""
    image, text = _features(4)
    remote = [_features(4, seed=s)[1] for s in (1, 2, 3)]
    scale, bias = _scalar(1.2), _scalar(-2.0)
    loss = SigLipLoss(chunk_size=chunk_size)
    loss.remote_blocks = lambda packed: remote
    every_text = torch.cat([text, *remote])
    logits = scale.exp() * image @ every_text.T + bias
    signs = -torch.ones_like(logits)
    signs.diagonal().fill_(1.0)
    reference = -F.logsigmoid(signs * logits).sum() / 4
    _assert_same(loss(image, text, scale, bias), reference, [image, text, *remote, scale, bias])


@pytest.mark.parametrize("batch", [3, 10])
def test_siglip_matches_open_clip(batch):
    image, text = _features(batch, seed=2)
    scale, bias = _scalar(1.7), _scalar(-4.0)
    theirs = oc.SigLipLoss()(image, text, scale.exp(), bias)
    _assert_same(SigLipLoss(chunk_size=4)(image, text, scale, bias), theirs, [image, text, scale, bias])


def test_siglip_upcasts_low_precision_logits():
    image, text = _features(16)
    scale, bias = _scalar(math.log(10)), _scalar(-10.0)
    expected = SigLipLoss()(image.float(), text.float(), scale.float(), bias.float())
    loss = SigLipLoss(chunk_size=5)(image.bfloat16(), text.bfloat16(), scale.bfloat16(), bias.bfloat16())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)


@pytest.mark.parametrize("loss_cls", [SigLipLoss, LlipLoss])
def test_chunk_size_must_be_positive(loss_cls):
    with pytest.raises(ValueError, match="chunk_size"):
        loss_cls(chunk_size=0)


def test_sigmoid_losses_need_one_caption_per_image():
    image, text = _features(4)
    with pytest.raises(ValueError, match="one caption per image"):
        SigLipLoss()(image, text[:3], _scalar(1.0))


# ---- Llip head ---------------------------------------------------------------------------------------


def _head(per_token_proj=True, seed=0):
    torch.manual_seed(seed)
    return LlipHead(VISION_W, TEXT_W, D, K, H, temperature=5.0, per_token_proj=per_token_proj).double()


def _llip_inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, K, VISION_W, generator=g, dtype=F64, requires_grad=True)
    pooled = torch.randn(batch, TEXT_W, generator=g, dtype=F64, requires_grad=True)
    text = F.normalize(torch.randn(batch, D, generator=g, dtype=F64), dim=-1).requires_grad_()
    return tokens, pooled, text


@pytest.mark.parametrize("per_token_proj", [True, False])
def test_llip_head_projects_tokens_and_text(per_token_proj):
    head = _head(per_token_proj)
    tokens, pooled, _ = _llip_inputs(5)
    keys, values = head.encode_image(tokens)
    queries = head.encode_text(pooled)
    assert keys.shape == values.shape == (5, H, K, D // H)
    assert queries.shape == (5, H, D // H)
    for ours, ref in zip((keys, values), ref_keys_values(head, tokens)):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(queries, (pooled @ head.query_proj).view(5, H, -1), rtol=0, atol=1e-12)


def test_llip_head_defaults_follow_the_paper():
    head = LlipHead(vision_width=768, text_width=512)
    assert (head.num_tokens, head.num_heads, head.temperature) == (64, 8, 5.0)
    assert head.key_proj.shape == (64, 768, 512) and head.out_proj.shape == (512, 512)


def test_llip_head_checks_its_inputs():
    with pytest.raises(ValueError, match="divisible"):
        LlipHead(VISION_W, TEXT_W, embed_dim=10, num_heads=3)
    with pytest.raises(ValueError, match="mixture tokens"):
        _head().encode_image(torch.randn(2, K + 1, VISION_W, dtype=F64))


@pytest.mark.parametrize("images, captions", [(1, 1), (4, 7), (6, 2)])
@pytest.mark.parametrize("temperature", [None, 0.5])
def test_llip_mix_matches_dense_reference(images, captions, temperature):
    head = _head()
    keys, values = head.encode_image(_llip_inputs(images)[0])
    queries = head.encode_text(_llip_inputs(captions, seed=1)[1])
    mixed = head.mix(keys, values, queries, temperature=temperature)
    tau = head.temperature if temperature is None else temperature
    assert mixed.shape == (images, captions, D)
    torch.testing.assert_close(mixed, ref_mix(keys, values, queries, head.out_proj, tau), rtol=0, atol=1e-12)
    torch.testing.assert_close(mixed.norm(dim=-1), torch.ones(images, captions, dtype=F64))


# ---- Llip loss ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 5, 8])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 100])
@pytest.mark.parametrize("per_token_proj", [True, False])
def test_llip_loss_matches_dense_reference(batch, chunk_size, per_token_proj):
    head = _head(per_token_proj)
    tokens, pooled, text = _llip_inputs(batch)
    scale, bias = _scalar(math.log(10)), _scalar(-5.0)
    keys, values = head.encode_image(tokens)
    ours = LlipLoss(chunk_size=chunk_size)(
        image_keys=keys,
        image_values=values,
        text_queries=head.encode_text(pooled),
        text_features=text,
        logit_scale=scale,
        logit_bias=bias,
        **_llip_kwargs(head),
    )
    inputs = [tokens, pooled, text, scale, bias, *head.parameters()]
    _assert_same(ours, ref_llip(head, tokens, pooled, text, scale, bias), inputs)


def test_llip_loss_without_bias():
    head = _head()
    tokens, pooled, text = _llip_inputs(4)
    scale = _scalar(1.0)
    keys, values = head.encode_image(tokens)
    ours = LlipLoss(chunk_size=3)(keys, values, head.encode_text(pooled), text, scale, **_llip_kwargs(head))
    _assert_same(ours, ref_llip(head, tokens, pooled, text, scale, None), [tokens, pooled, text, scale])


def _kept_numel(fn):
    """Elements of the tensors autograd saved while `fn` ran that are still alive after it returned:
    what the graph keeps for backward (a chunk's own graph is freed with the chunk)."""
    saved = []

    def pack(tensor):
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    gc.collect()
    return sum(t.numel() for ref in saved if (t := ref()) is not None), result


def _llip_kwargs(head):
    return dict(llip_out_proj=head.out_proj, llip_temperature=head.temperature)


def test_llip_loss_keeps_no_pairwise_tensor_for_backward():
    """Neither the B_i x B_t x D mixed embeddings nor the attention weights outlive their chunk: what
    the graph keeps is at most the size of the inputs, while the dense mix keeps > B*B*D."""
    batch = 24
    head = _head()
    tokens, pooled, text = _llip_inputs(batch)
    keys, values = head.encode_image(tokens)
    queries = head.encode_text(pooled)
    kept, loss = _kept_numel(
        lambda: LlipLoss(chunk_size=5)(keys, values, queries, text, _scalar(2.0), **_llip_kwargs(head))
    )
    inputs = keys.numel() + values.numel() + queries.numel() + text.numel()
    assert kept <= inputs
    assert _kept_numel(lambda: head.mix(keys, values, queries))[0] > batch * batch * D
    loss.backward()  # and the gradients still arrive
    assert head.out_proj.grad is not None and head.key_proj.grad is not None


@pytest.mark.parametrize("loss", ["siglip", "llip"])
def test_autocast_loss_is_fp32_and_close_to_exact(loss):
    """Under bf16 autocast (matrix operands cast once at the loss's entry) the loss is summed in
    fp32 and fp32 inputs get fp32 gradients close to the exact ones."""
    head = _head().float()
    tokens, pooled, text = (t.detach().float().requires_grad_() for t in _llip_inputs(16))
    scale, bias = torch.tensor(2.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)

    def run():
        if loss == "siglip":
            image = F.normalize(tokens.flatten(1)[:, :D], dim=-1)
            return SigLipLoss(chunk_size=5)(image, text, scale, bias)
        keys, values = head.encode_image(tokens)
        queries = head.encode_text(pooled)
        return LlipLoss(chunk_size=5)(keys, values, queries, text, scale, bias, **_llip_kwargs(head))

    inputs = [tokens, text, scale, bias]
    exact = run()
    exact_grads = torch.autograd.grad(exact, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run()
    low_grads = torch.autograd.grad(low, inputs)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact, rtol=3e-2, atol=0)
    for a, b in zip(low_grads, exact_grads):
        assert a.dtype == torch.float32
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98


@pytest.mark.parametrize("loss", ["siglip", "llip"])
def test_no_grad_gives_the_same_loss_without_a_graph(loss):
    head = _head()
    tokens, pooled, text = _llip_inputs(7)
    scale, bias = _scalar(1.0), _scalar(-2.0)

    def run():
        if loss == "siglip":
            return SigLipLoss(chunk_size=3)(F.normalize(tokens.flatten(1)[:, :D], dim=-1), text, scale, bias)
        keys, values = head.encode_image(tokens)
        return LlipLoss(chunk_size=3)(
            keys, values, head.encode_text(pooled), text, scale, bias, **_llip_kwargs(head)
        )

    with_graph = run()
    with torch.no_grad():
        without = run()
    assert not without.requires_grad and with_graph.requires_grad
    torch.testing.assert_close(without, with_graph.detach(), rtol=0, atol=1e-12)
