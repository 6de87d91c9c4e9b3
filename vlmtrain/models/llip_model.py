"""The Llip model: a two-tower model whose image side is K mixture tokens mixed per caption.

The text tower's pooled state h gives the caption embedding (h P, the tower's own projection). By default
the query comes from that embedding ((h P) W_q: a shared projection, the query's rank bounded by the
embedding width); `query_from="pooled"` takes it from h itself (h W_q), as in the paper and its code.
At the scales measured here the pooled query leaves training at the all-negative plateau, hence the
default (configs/model/llip.yaml). The image tower's mixture tokens give keys and values. An image has no caption-free embedding:
`encode_image` returns its keys and values (flattened), and `similarity` mixes them per caption.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vlmtrain.models.llip_head import LlipHead, mixed_cosine
from vlmtrain.models.two_tower import TwoTower

QUERY_SOURCES = ("pooled", "embedding")


class LlipModel(TwoTower):
    output_keys = (
        "image_keys",
        "image_values",
        "text_queries",
        "text_features",
        "logit_scale",
        "logit_bias",
        "llip_out_proj",
        "llip_temperature",
    )
    reads_mixture_tokens = True

    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        embed_dim: int,
        *,
        num_heads: int = 8,
        temperature: float = 5.0,
        query_from: str = "embedding",
        qkv_norm: bool = False,
        init_logit_scale: float = math.log(1 / 0.07),
        init_logit_bias: float | None = -10.0,
        eval_chunk_size: int = 256,
    ) -> None:
        super().__init__(image_encoder, text_encoder, embed_dim, init_logit_scale, init_logit_bias)
        num_tokens = getattr(image_encoder, "mixture_tokens", 0)
        if not num_tokens:
            raise ValueError(
                f"loss=llip needs an image tower with mixture tokens (model.image_encoder.mixture_tokens > 0); "
                f"{type(image_encoder).__name__} has none"
            )
        if query_from not in QUERY_SOURCES:
            raise ValueError(f"model.query_from: expected one of {QUERY_SOURCES}, got {query_from!r}")
        self.query_from = query_from
        text_encoder.return_pooled = query_from == "pooled"
        query_width = text_encoder.width if query_from == "pooled" else embed_dim
        self.head = LlipHead(
            image_encoder.width, query_width, embed_dim, num_tokens, num_heads, temperature, qkv_norm=qkv_norm
        )
        self.eval_chunk_size = eval_chunk_size

    def _image_keys_values(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head.encode_image(self.image_encoder(images))

    def _text_features_queries(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.query_from == "pooled":
            pooled, embedding = self.text_encoder(tokens)
        else:
            pooled = embedding = self.text_encoder(tokens)
        return F.normalize(embedding, dim=-1), self.head.encode_text(pooled)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        keys, values = self._image_keys_values(images)
        return torch.cat([keys.flatten(1), values.flatten(1)], dim=1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        features, queries = self._text_features_queries(tokens)
        return torch.cat([features, queries.flatten(1)], dim=1)

    def average_text(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        mean = text_embeddings.mean(0)
        return torch.cat([F.normalize(mean[: self.embed_dim], dim=-1), mean[self.embed_dim :]])

    def similarity(
        self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, temperature: float | None = None
    ) -> torch.Tensor:
        """(B_i, B_t): each image mixed for each caption, in chunks of captions to bound memory."""
        heads, tokens = self.head.num_heads, self.head.num_tokens
        keys, values = rearrange(image_embeddings, "b (kv h k d) -> kv b h k d", kv=2, h=heads, k=tokens)
        features, queries = text_embeddings[:, : self.embed_dim], text_embeddings[:, self.embed_dim :]
        queries = rearrange(queries, "b (h d) -> b h d", h=heads)
        tau = self.head.temperature if temperature is None else temperature
        scores = []
        for start in range(0, features.shape[0], self.eval_chunk_size):
            stop = start + self.eval_chunk_size
            chunk = queries[start:stop], features[start:stop]
            scores.append(mixed_cosine(keys, values, *chunk, self.head.out_proj, tau))
        return torch.cat(scores, dim=1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        keys, values = self._image_keys_values(images)
        features, queries = self._text_features_queries(tokens)
        out = {
            "image_keys": keys,
            "image_values": values,
            "text_queries": queries,
            "text_features": features,
            "logit_scale": self.logit_scale,
            "llip_out_proj": self.head.out_proj,
            "llip_temperature": self.head.temperature,
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out
