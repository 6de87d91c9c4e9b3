"""Image towers. Each maps (B, 3, H, W) images to (B, embed_dim) features and says how to preprocess.

With `mixture_tokens=K` (Llip) a tower instead returns the final states of K learnable mixture tokens,
(B, K, width). `mixture_layout` says where they sit: `replace_class` (the Llip paper) puts them where the
class token was, each with its own position embedding (K + P tokens); `append` keeps the class token and
adds the K tokens after the patches, without position embeddings (1 + P + K tokens; timm's register
tokens differ, see `TimmEncoder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmtrain.models import libraries, locking
from vlmtrain.models.weights import load_weights, open_clip_part

LAYOUTS = ("replace_class", "append")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"model.image_encoder.mixture_layout: expected one of {LAYOUTS}, got {layout!r}")


class OpenClipVisionEncoder(nn.Module):
    """An open_clip vision tower, from a named preset (`ViT-B-32`) and/or explicit `vision_cfg` fields.

    `pretrained_path`: a file holding this tower's weights, or a whole open_clip checkpoint (its `visual.`
    part is taken). `locked`/`unlocked_blocks`: LiT (`vlmtrain.models.locking`).
    """

    def __init__(
        self,
        embed_dim: int,
        model_name: str | None = None,
        *,
        vision_cfg: dict[str, Any] | None = None,
        pretrained_path: str | None = None,
        mixture_tokens: int = 0,
        mixture_layout: str = "replace_class",
        quick_gelu: bool = False,
        grad_checkpointing: bool = False,
        locked: bool = False,
        unlocked_blocks: int = 0,
    ) -> None:
        super().__init__()
        _check_layout(mixture_layout)
        open_clip = libraries.open_clip()
        cfg = dict(open_clip.get_model_config(model_name)["vision_cfg"]) if model_name else {}
        cfg.update(vision_cfg or {})
        self.vision_cfg = cfg
        if cfg.get("timm_model_name"):  # a timm trunk inside open_clip (SigLIP's presets)
            open_clip = libraries.open_clip("timm")
        vision = open_clip.model.CLIPVisionCfg(**cfg)
        self.tower = open_clip.model._build_vision_tower(embed_dim, vision, quick_gelu=quick_gelu)
        size = cfg.get("image_size", 224)
        self.image_size = size if isinstance(size, int) else size[0]
        self.mean, self.std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        self.mixture_tokens, self.mixture_layout = mixture_tokens, mixture_layout
        self.width = getattr(getattr(self.tower, "transformer", None), "width", None)
        if pretrained_path:  # before mixture tokens: a CLIP tower's weights start a Llip one
            load_weights(self.tower, Path(pretrained_path), open_clip_part("visual"))
        if mixture_tokens:
            self._add_mixture_tokens(mixture_tokens, mixture_layout)
        locking.set_grad_checkpointing(self.tower, grad_checkpointing)
        self._lock(locked, unlocked_blocks)

    def _add_mixture_tokens(self, count: int, layout: str) -> None:
        tower = self.tower
        if not hasattr(tower, "transformer") or tower.attn_pool is not None:
            raise ValueError("model.image_encoder.mixture_tokens: needs a plain open_clip ViT")
        width = self.width
        scale = width**-0.5
        if layout == "replace_class":  # K class-like tokens, each with a position (the paper's `ncls`)
            patches = tower.positional_embedding.shape[0] - 1
            tower.class_embedding = nn.Parameter(scale * torch.randn(count, width))
            tower.positional_embedding = nn.Parameter(scale * torch.randn(count + patches, width))
        else:
            self.mixture = nn.Parameter(torch.randn(count, width) * scale)
        tower.proj = None  # the Llip head projects each token instead

    def _lock(self, locked: bool, unlocked_blocks: int) -> None:
        blocks = getattr(getattr(self.tower, "transformer", None), "resblocks", None)
        if blocks is None:  # a timm tower inside open_clip: its trunk locks, its head trains (as open_clip)
            groups = locking.timm_groups(self.tower.trunk)
            locking.check_lock("model.image_encoder", locked, unlocked_blocks, groups)
            if locked:
                self.tower.lock(unlocked_blocks, freeze_bn_stats=True)
            return
        locking.check_lock("model.image_encoder", locked, unlocked_blocks, len(blocks))
        if locked:
            tail = [self.tower.ln_post, self.tower.proj] if unlocked_blocks else []
            locking.lock(self, locking.last_blocks(blocks, unlocked_blocks) + tail)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._mixture(images) if self.mixture_tokens else self.tower(images)

    def _mixture(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, K, width): the mixture tokens after the last block and final norm."""
        tower, count = self.tower, self.mixture_tokens
        if self.mixture_layout == "append":
            x = tower._embeds(images)  # class + patch tokens, position-embedded, after ln_pre
            mixture = tower.ln_pre(self.mixture.to(x.dtype)).expand(x.shape[0], -1, -1)
            x = tower.transformer(torch.cat([x, mixture], dim=1))
            return tower.ln_post(x[:, -count:])
        patches = tower.conv1(images).flatten(2).transpose(1, 2)
        mixture = tower.class_embedding.to(patches.dtype).expand(patches.shape[0], -1, -1)
        x = torch.cat([mixture, patches], dim=1) + tower.positional_embedding.to(patches.dtype)
        x = tower.transformer(tower.ln_pre(x))
        return tower.ln_post(x[:, :count])


class TimmEncoder(nn.Module):
    """Any timm model by name (random init unless `pretrained_path`), pooled features + a linear projection.
    Llip's mixture tokens are timm's register tokens, which timm places after the class token (`append`)
    or, with `replace_class`, in its place (no class token)."""

    def __init__(
        self,
        embed_dim: int,
        model_name: str,
        *,
        image_size: int = 224,
        pretrained_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        proj_bias: bool = False,
        mixture_tokens: int = 0,
        mixture_layout: str = "append",
        grad_checkpointing: bool = False,
        locked: bool = False,
        unlocked_blocks: int = 0,
    ) -> None:
        super().__init__()
        import timm

        _check_layout(mixture_layout)
        kwargs = dict(model_kwargs or {})
        if "vit" in model_name or "deit" in model_name or "eva" in model_name:
            kwargs.setdefault("img_size", image_size)
        if mixture_tokens:  # timm ViTs take extra learnable tokens as "register" tokens
            kwargs["reg_tokens"] = mixture_tokens
            if mixture_layout == "replace_class":
                kwargs.update(class_token=False, global_pool="avg")
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
        locking.set_grad_checkpointing(self.trunk, grad_checkpointing)
        locking.check_lock("model.image_encoder", locked, unlocked_blocks, locking.timm_groups(self.trunk))
        if locked:
            locking.lock(self)
            locking.lock_timm(self.trunk, unlocked_blocks)
            if unlocked_blocks and self.proj is not None:
                self.proj.requires_grad_(True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.mixture_tokens:  # (B, K, width): the register tokens' final (normed) states
            tokens = self.trunk.forward_features(images)
            end = self.trunk.num_prefix_tokens
            return tokens[:, end - self.mixture_tokens : end]
        return self.proj(self.trunk(images))
