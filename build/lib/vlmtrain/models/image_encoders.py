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
    """An open_clip vision tower, from a named preset (`ViT-B-32`) and/or explicit `vision_cfg` fields.

    With `mixture_tokens=K` (Llip), K learnable tokens join the patch sequence and `forward_mixture`
    returns their final states; the tower's own pooled projection is then unused and dropped.
    """

    def __init__(
        self,
        embed_dim: int,
        model_name: str | None = None,
        vision_cfg: dict[str, Any] | None = None,
        pretrained_path: str | None = None,
        mixture_tokens: int = 0,
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
        self.mixture_tokens, self.width = mixture_tokens, self.tower.transformer.width
        if mixture_tokens:
            self.mixture = nn.Parameter(torch.randn(mixture_tokens, self.width) * self.width**-0.5)
            self.tower.proj = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tower(images)

    def forward_mixture(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, K, width): the mixture tokens after the last block and final norm."""
        x = self.tower._embeds(images)  # class + patch tokens, position-embedded, after ln_pre
        mixture = self.tower.ln_pre(self.mixture.to(x.dtype)).expand(x.shape[0], -1, -1)
        x = self.tower.transformer(torch.cat([x, mixture], dim=1))
        return self.tower.ln_post(x[:, -self.mixture_tokens :])


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
        mixture_tokens: int = 0,
    ) -> None:
        super().__init__()
        kwargs = dict(model_kwargs or {})
        if "vit" in model_name or "deit" in model_name or "eva" in model_name:
            kwargs.setdefault("img_size", image_size)
        if mixture_tokens:  # timm ViTs take extra learnable tokens as "register" tokens
            kwargs["reg_tokens"] = mixture_tokens
        try:
            self.trunk = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
        except TypeError as error:
            if mixture_tokens and "reg_tokens" in str(error):
                raise ValueError(
                    f"model.image_encoder: timm model {model_name} cannot hold Llip mixture tokens"
                ) from None
            raise
        if pretrained_path:
            load_weights(self.trunk, Path(pretrained_path))
        self.mixture_tokens, self.width = mixture_tokens, self.trunk.num_features
        self.proj = None if mixture_tokens else nn.Linear(self.trunk.num_features, embed_dim, bias=proj_bias)
        self.image_size = image_size
        data_cfg = timm.data.resolve_data_config({}, model=self.trunk)
        self.mean, self.std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(images))

    def forward_mixture(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, K, width): the register tokens' final (normed) states."""
        tokens = self.trunk.forward_features(images)
        end = self.trunk.num_prefix_tokens
        return tokens[:, end - self.mixture_tokens : end]
