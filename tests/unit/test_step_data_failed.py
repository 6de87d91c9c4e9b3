"""A step whose batch only stands in for one the loader failed to give: the backward runs (so a rank joins
its collectives), then nothing is updated: weights, optimizer state and schedule stay as they were."""

from __future__ import annotations

import torch

from tests.helpers.tiny import TinyTwoTower
from vlmtrain.losses import ClipLoss
from vlmtrain.train.step import StepSettings, train_step


def test_a_failed_data_step_updates_nothing_and_says_so():
    torch.manual_seed(0)
    model, images, texts = TinyTwoTower().double(), torch.randn(6, 5).double(), torch.randn(6, 5).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    settings = StepSettings(grad_clip=1.0, precision="fp32")
    first = train_step(model, ClipLoss(), optimizer, scheduler, images, texts, settings=settings)
    assert not first.skipped and not first.decisions.data_failed
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state[model.image.weight].items()}

    out = train_step(
        model, ClipLoss(), optimizer, scheduler, images, texts, settings=settings, data_failed=True
    )
    assert out.decisions.data_failed and out.skipped and out.decisions.stop == 0
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, moments[k]) for k, v in optimizer.state[model.image.weight].items())
    assert all(p.grad is None for p in model.parameters())
    assert scheduler.last_epoch == 1 and out.lr == scheduler.get_last_lr()[0] == 5e-3  # not advanced
