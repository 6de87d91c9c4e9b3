"""The Llip head: a caption-conditioned mixture of an image's K mixture-token embeddings.

Llip ("Modeling Caption Diversity in Contrastive Vision-Language Pretraining", Lavoie et al., 2024)
gives the vision tower K learnable mixture tokens. The head projects each token's output to a key and a
value (one projection per token by default, as in the paper), projects a text state (the caption
embedding by default, the pooled state in the paper: `LlipModel.query_from`) to one query per head,
and for every (image, caption) pair mixes the image's values with the softmax over the K tokens of
q.k / tau. Concatenated heads go through an output projection and are L2-normalised; the
caption's own text feature is then scored against this caption-specific image embedding.

With `qkv_norm` (the paper's H/14 and G/14) keys, values and queries each pass a LayerNorm over the
full embedding width before they are split into heads.

tau is a fixed temperature (5 in the paper), not the usual 1/sqrt(d): a flatter softmax keeps every
mixture token in use. `mix` takes it as an argument too, for the temperature sweep at zero-shot time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class LlipHead(nn.Module):
    """Keys and values from (B, K, vision_width) mixture tokens, queries from (B, text_width) text states.

    Keys and values use embed_dim // num_heads dimensions per head; `mix` returns embed_dim.
    """

    def __init__(
        self,
        vision_width: int,
        text_width: int,
        embed_dim: int = 512,
        num_tokens: int = 64,
        num_heads: int = 8,
        temperature: float = 5.0,
        *,
        per_token_proj: bool = True,
        qkv_norm: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.num_tokens, self.num_heads, self.temperature = num_tokens, num_heads, temperature
        shape = (num_tokens, vision_width, embed_dim) if per_token_proj else (vision_width, embed_dim)
        self.key_proj = nn.Parameter(torch.randn(shape) * vision_width**-0.5)
        self.value_proj = nn.Parameter(torch.randn(shape) * vision_width**-0.5)
        self.query_proj = nn.Parameter(torch.randn(text_width, embed_dim) * text_width**-0.5)
        self.out_proj = nn.Parameter(torch.randn(embed_dim, embed_dim) * embed_dim**-0.5)
        norm = (lambda: nn.LayerNorm(embed_dim)) if qkv_norm else nn.Identity
        self.key_norm, self.value_norm, self.query_norm = norm(), norm(), norm()

    def _project_tokens(self, tokens: torch.Tensor, weight: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """(B, K, W) -> (B, H, K, d): per-token (K, W, E) or shared (W, E) projection, split into heads."""
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} mixture tokens, got {tokens.shape[1]}")
        projected = torch.einsum("bkw,kwe->bke", tokens, weight) if weight.dim() == 3 else tokens @ weight
        return rearrange(norm(projected), "b k (h d) -> b h k d", h=self.num_heads)

    def encode_image(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixture-token outputs (B_i, K, vision_width) -> keys (B_i, H, K, d), values (B_i, H, K, d)."""
        keys = self._project_tokens(tokens, self.key_proj, self.key_norm)
        return keys, self._project_tokens(tokens, self.value_proj, self.value_norm)

    def encode_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled text state (B_t, text_width) -> queries (B_t, H, d)."""
        return rearrange(self.query_norm(pooled @ self.query_proj), "b (h d) -> b h d", h=self.num_heads)

    def mix(
        self,
        image_keys: torch.Tensor,
        image_values: torch.Tensor,
        text_queries: torch.Tensor,
        temperature: float | None = None,
    ) -> torch.Tensor:
        """`mix` with this head's output projection and (unless given) its temperature."""
        tau = self.temperature if temperature is None else temperature
        return mix(image_keys, image_values, text_queries, self.out_proj, tau)


def mix(
    image_keys: torch.Tensor,
    image_values: torch.Tensor,
    text_queries: torch.Tensor,
    out_proj: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Every image mixed for every caption: (B_i, H, K, d) x2, (B_t, H, d) -> (B_i, B_t, E), unit norm.

    Memory is O(B_i * B_t * max(H*K, E)); losses call it on chunks of captions.
    """
    return F.normalize(
        _mix_unnormalised(image_keys, image_values, text_queries, out_proj, temperature), dim=-1
    )


def mixed_cosine(
    image_keys: torch.Tensor,
    image_values: torch.Tensor,
    text_queries: torch.Tensor,
    text_features: torch.Tensor,
    out_proj: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """(B_i, B_t): <mix(...)[i, t], text_features[t]>, in fp32 at least, without building the normalised mix
    (one pass fewer over the B_i x B_t x E tensor, forward and backward)."""
    mixed = _mix_unnormalised(image_keys, image_values, text_queries, out_proj, temperature)
    wide = torch.promote_types(mixed.dtype, torch.float32)  # bf16/fp16 -> fp32
    dots = torch.einsum("ite,te->it", mixed, text_features).to(wide)
    return dots / torch.linalg.vector_norm(mixed, dim=-1, dtype=wide).clamp_min(1e-12)


def _mix_unnormalised(keys, values, queries, out_proj, temperature) -> torch.Tensor:  # noqa: ANN001
    # 1/tau on the (B_t, H, d) queries rather than on the (B_i, H, B_t, K) scores: same math, less work
    scores = torch.einsum("ihkd,thd->ihtk", keys, queries / temperature)
    mixed = torch.einsum("ihtk,ihkd->ithd", scores.softmax(dim=-1), values)
    return mixed.flatten(2) @ out_proj
