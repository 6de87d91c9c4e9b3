"""Image towers. Each maps (B, 3, H, W) images to (B, embed_dim) features and says how to preprocess."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from torch import nn

from vlmtrain.models.weights import load_weights


class OpenClipVisionEncoder(nn.Module):
    """An open_clip vision tower, from a named preset (`ViT-B-32`) and/or explicit `vision_cfg` fields."""

    def __init__(
        self,
        embed_dim: int,
        model_name: str | None = None,
        vision_cfg: dict[str, Any] | None = None,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        cfg = dict(open_clip.get_model_config(model_name)["vision_cfg"]) if model_name else {}
        cfg.update(vision_cfg or {})
        self.vision_cfg = cfg
        self.tower = _build_vision_tower(embed_dim, CLIPVisionCfg(**cfg))
        size = cfg.get("image_size", 224)
        self.image_size = size if isinstance(size, int) else size[0]
        self.mean, self.std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        if pretrained_path:
            load_weights(self.tower, Path(pretrained_path))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tower(images)


class TimmEncoder(nn.Module):
    """Any timm model by name (random init unless `pretrained_path`), pooled features + a linear projection."""

    def __init__(
        self,
        embed_dim: int,
        model_name: str,
        image_size: int = 224,
        pretrained_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        proj_bias: bool = False,
    ) -> None:
        super().__init__()
        kwargs = dict(model_kwargs or {})
        if "vit" in model_name or "deit" in model_name or "eva" in model_name:
            kwargs.setdefault("img_size", image_size)
        self.trunk = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
        if pretrained_path:
            load_weights(self.trunk, Path(pretrained_path))
        self.proj = nn.Linear(self.trunk.num_features, embed_dim, bias=proj_bias)
        self.image_size = image_size
        data_cfg = timm.data.resolve_data_config({}, model=self.trunk)
        self.mean, self.std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(images))
