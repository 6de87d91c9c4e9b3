"""Gradient accumulation over micro-batches gives the whole batch's loss and gradients (all negatives)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.tiny import K, TinyLlip, TinyTwoTower
from vlmtrain.losses import ClipLoss, LlipLoss, SigLipLoss
from vlmtrain.train.step import StepSettings, loss_and_backward, train_step

CASES = {
    "clip": (TinyTwoTower, ClipLoss),
    "siglip": (TinyTwoTower, lambda: SigLipLoss(chunk_size=4)),
    "llip": (TinyLlip, lambda: LlipLoss(chunk_size=4)),
}


def _batch(model_cls, n=12):
    g = torch.Generator().manual_seed(1)
    shape = (n, K, 5) if model_cls is TinyLlip else (n, 5)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(
        n, 5, generator=g, dtype=torch.float64
    )


def _grads(model, loss_fn, images, texts, micro_batches):
    model.zero_grad(set_to_none=True)
    loss = loss_and_backward(model, loss_fn, images, texts, "fp32", micro_batches)
    return loss, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("micro_batches", [2, 3, 12])
@pytest.mark.parametrize("case", sorted(CASES))
def test_micro_batches_give_the_whole_batch_gradients(case, micro_batches):
    model_cls, make_loss = CASES[case]
    torch.manual_seed(0)
    model, loss_fn = model_cls().double(), make_loss()
    images, texts = _batch(model_cls)
    loss, expected = _grads(model, loss_fn, images, texts, 1)
    accumulated_loss, grads = _grads(model, loss_fn, images, texts, micro_batches)
    torch.testing.assert_close(accumulated_loss, loss, rtol=0, atol=1e-12)
    for key, grad in expected.items():
        torch.testing.assert_close(grads[key], grad, rtol=0, atol=1e-12, msg=lambda m, k=key: f"{k}: {m}")


class DropoutTwoTower(TinyTwoTower):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Linear(16, self.text.out_features))


def test_second_pass_replays_the_first_pass_randomness():
    """With dropout, the re-forward must draw the masks the graph-free pass drew: the gradients then
    equal those of a reference that keeps the first pass's graph."""
    torch.manual_seed(0)
    model, loss_fn = DropoutTwoTower().double(), ClipLoss()
    images, texts = _batch(TinyTwoTower)
    torch.manual_seed(5)
    _, grads = _grads(model, loss_fn, images, texts, 3)

    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    outs = [model(i, t) for i, t in zip(images.chunk(3), texts.chunk(3))]
    joined = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    loss_fn(**joined, logit_scale=model.logit_scale, logit_bias=model.logit_bias).backward()
    for key, p in model.named_parameters():
        torch.testing.assert_close(grads[key], p.grad, rtol=0, atol=1e-12, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_non_finite_loss_still_runs_backward_and_the_step_skips_the_update(micro_batches):
    """Every rank must join DDP's gradient all-reduce, so the backward runs; train_step then discards it."""
    torch.manual_seed(0)
    model = TinyTwoTower().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, texts = _batch(TinyTwoTower)
    images[0] = float("nan")
    loss = loss_and_backward(model, ClipLoss(), images, texts, "fp32", micro_batches)
    assert not torch.isfinite(loss)
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    settings = StepSettings(grad_clip=1.0, precision="fp32", micro_batches=micro_batches)
    out = train_step(model, ClipLoss(), optimizer, scheduler, images, texts, settings=settings)
    assert out.skipped and out.decisions.non_finite and out.lr == 1e-3 and scheduler.last_epoch == 1
    assert all(p.grad is None for p in model.parameters()) and not optimizer.state
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", ["clip", "llip"])
def test_micro_batches_under_bf16_autocast_stay_close_to_the_whole_batch(case):
    model_cls, make_loss = CASES[case]
    torch.manual_seed(0)
    model, loss_fn = model_cls(), make_loss()
    images, texts = (t.float() for t in _batch(model_cls))
    model.zero_grad(set_to_none=True)
    loss = loss_and_backward(model, loss_fn, images, texts, "bf16", 1)
    expected = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    accumulated = loss_and_backward(model, loss_fn, images, texts, "bf16", 3)
    torch.testing.assert_close(accumulated, loss, rtol=1e-2, atol=0)
    for key, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        similarity = torch.nn.functional.cosine_similarity(p.grad.flatten(), expected[key].flatten(), dim=0)
        assert similarity > 0.99, key
