"""The two-tower contrastive model: an image tower, a text tower, a learnable temperature (and bias)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TwoTower(nn.Module):
    output_keys = ("image_features", "text_features", "logit_scale", "logit_bias")
    reads_mixture_tokens = False  # one image vector per image; the Llip model reads K token states

    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        embed_dim: int,
        init_logit_scale: float = math.log(1 / 0.07),
        init_logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        if getattr(image_encoder, "mixture_tokens", 0) and not self.reads_mixture_tokens:
            raise ValueError(
                "model.image_encoder.mixture_tokens: only the Llip model (loss=llip) reads mixture tokens; "
                "set it to 0 for a two-tower model"
            )
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.embed_dim = embed_dim
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = (
            None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))
        )

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_encoder(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_encoder(tokens), dim=-1)

    def similarity(
        self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, temperature: float | None = None
    ) -> torch.Tensor:
        """(B_i, B_t) cosine similarities of what `encode_image` and `encode_text` return.
        `temperature` is a Llip mixing temperature; a two-tower model has none and ignores it."""
        return image_embeddings @ text_embeddings.T

    def average_text(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """One embedding for several prompts of a class (zero-shot classifiers)."""
        return F.normalize(text_embeddings.mean(0), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {
            "image_features": self.encode_image(images),
            "text_features": self.encode_text(tokens),
            "logit_scale": self.logit_scale,
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out
