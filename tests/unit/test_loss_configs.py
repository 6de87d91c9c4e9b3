"""The loss config group: `loss=siglip` also gives the model its bias and SigLIP's initial temperature."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from vlmtrain.cli import compose_checked
from vlmtrain.losses import ClipLoss, SigLipLoss


def _compose(*overrides: str):
    return compose_checked("train", list(overrides))  # composition checks every key and type


def _model(cfg):
    """The two-tower model with stand-in towers: only the temperature and bias are under test here."""
    node = OmegaConf.to_container(cfg.model, resolve=True)
    node["image_encoder"] = node["text_encoder"] = {"_target_": "torch.nn.Identity"}
    return instantiate(node)


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
