"""Small modules and references shared by the loss, accumulation and distributed tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmtrain.models.llip_head import LlipHead

D, K, H, VISION_W, TEXT_W = 8, 4, 2, 10, 6  # embedding width, mixture tokens, heads, tower widths
VISION = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}


def load_open_clip_losses():
    """open_clip's loss.py on its own: importing the package builds its whole model zoo (seconds)."""
    path = Path(importlib.util.find_spec("open_clip").origin).with_name("loss.py")
    spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


oc = load_open_clip_losses()  # open_clip's loss.py, loaded once


class TinyTwoTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image, self.text = nn.Linear(5, D), nn.Linear(5, D)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0))

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict:
        image, text = F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1)
        return dict(
            image_features=image, text_features=text, logit_scale=self.logit_scale, logit_bias=self.logit_bias
        )


class TinyLlip(nn.Module):
    """Per-token vision layer and a text layer feeding a LlipHead: the head's parameters are used by the
    loss after the DDP forward, inside chunks whose gradients are taken during the loss's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.vision, self.text_state = nn.Linear(5, VISION_W), nn.Linear(5, TEXT_W)
        self.head = LlipHead(VISION_W, TEXT_W, D, K, H)
        self.text_proj = nn.Linear(TEXT_W, D)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0))

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict:
        keys, values = self.head.encode_image(self.vision(images))
        state = self.text_state(texts)
        return dict(
            image_keys=keys,
            image_values=values,
            text_queries=self.head.encode_text(state),
            text_features=F.normalize(self.text_proj(state), dim=-1),
            logit_scale=self.logit_scale,
            logit_bias=self.logit_bias,
            llip_out_proj=self.head.out_proj,
            llip_temperature=self.head.temperature,
        )


def tiny_model_config(llip: bool = False, embed_dim: int = 32) -> dict:
    """A small open_clip-tower CLIP (or Llip, with 4 mixture tokens) as a training checkpoint's model config."""
    image = {
        "_target_": "vlmtrain.models.image_encoders.OpenClipVisionEncoder",
        "embed_dim": embed_dim,
        "vision_cfg": VISION,
        "mixture_tokens": 4 if llip else 0,
    }
    text = {
        "_target_": "vlmtrain.models.text_encoders.OpenClipTextEncoder",
        "embed_dim": embed_dim,
        "text_cfg": TEXT,
    }
    if llip:
        target = {"_target_": "vlmtrain.models.llip_model.LlipModel", "num_heads": 2, "init_logit_bias": -4.0}
    else:
        target = {"_target_": "vlmtrain.models.two_tower.TwoTower"}
    return {**target, "embed_dim": embed_dim, "image_encoder": image, "text_encoder": text}


def save_tiny_checkpoint(path: Path, config: dict, seed: int = 0) -> Path:
    """A training checkpoint as the trainer writes it, weights perturbed away from their init."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    model = instantiate(OmegaConf.create(config))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "train_state": {"step": 1}, "config": {"model": config}}, path)
    return path
