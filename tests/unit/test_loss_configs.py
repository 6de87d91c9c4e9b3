"""The loss config group: `loss=siglip` also gives the model its bias and SigLIP's initial temperature."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from torch import nn

from vlmtrain.config import check_targets
from vlmtrain.losses import ClipLoss, SigLipLoss


def _compose(*overrides: str):
    with initialize_config_module(config_module="vlmtrain.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _model(cfg):
    """The two-tower model with stand-in towers: only the temperature and bias are under test here."""
    return instantiate(cfg.model, image_encoder=nn.Identity(), text_encoder=nn.Identity())


@pytest.mark.parametrize(
    "overrides, loss_cls, scale, bias",
    [
        ((), ClipLoss, math.log(1 / 0.07), None),
        (("loss=clip",), ClipLoss, math.log(1 / 0.07), None),
        (("loss=siglip",), SigLipLoss, math.log(10), -10.0),
        (("loss=siglip", "model.init_logit_bias=-5", "loss.chunk_size=64"), SigLipLoss, math.log(10), -5.0),
    ],
)
def test_loss_choice_sets_model_temperature_and_bias(overrides, loss_cls, scale, bias):
    cfg = _compose(*overrides)
    for group in ("model", "loss"):
        check_targets(cfg[group], group)
    assert isinstance(instantiate(cfg.loss), loss_cls)
    model = _model(cfg)
    assert model.logit_scale.item() == pytest.approx(scale, abs=1e-6)
    if bias is None:
        assert model.logit_bias is None
    else:
        assert isinstance(model.logit_bias, nn.Parameter)
        assert model.logit_bias.item() == pytest.approx(bias)


def test_siglip_config_options_reach_the_loss():
    loss = instantiate(_compose("loss=siglip", "loss.chunk_size=64", "loss.bidirectional=false").loss)
    assert (loss.chunk_size, loss.bidirectional) == (64, False)


def test_siglip_model_outputs_feed_the_loss():
    """What the composed model returns is what the loss takes (the trainer calls loss_fn(**outputs))."""
    cfg = _compose("loss=siglip")
    model, loss_fn = _model(cfg), instantiate(cfg.loss)
    outputs = model(torch.randn(4, cfg.model.embed_dim), torch.randn(4, cfg.model.embed_dim))
    assert "logit_bias" in outputs
    loss = loss_fn(**outputs)
    loss.backward()
    assert torch.isfinite(loss) and model.logit_bias.grad is not None
