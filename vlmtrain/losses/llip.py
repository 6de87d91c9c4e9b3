"""Llip: the sigmoid loss on caption-conditioned image embeddings.

For image i and caption j of the global batch the logit is t * <mix(keys_i, values_i, query_j), y_j> + b,
where `mix` is the model's `LlipHead.mix` and y_j the caption's L2-normalised text feature; the loss is
SigLIP's over these logits (z = +1 on matching pairs), normalised and distributed the same way (see
`vlmtrain.losses.siglip` and the convention in `vlmtrain.losses.clip`).

Images (keys and values) stay on their rank; captions (text feature and query, packed into one message)
travel round the ring. The mixed embeddings are B_local x chunk x D per chunk and are recomputed in
backward, never stored, so memory grows only with the caption inputs themselves (linear in the global
batch) instead of B_local x B_global x D.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from vlmtrain.losses.collectives import ring_exchange
from vlmtrain.losses.siglip import sigmoid_ring_loss

MixFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LlipLoss(nn.Module):
    """`chunk_size`: captions per chunk (None: one chunk per ring block, i.e. B captions).
    `bidirectional`: pass caption blocks both ways round the ring (half the sequential hops)."""

    def __init__(self, chunk_size: int | None = None, bidirectional: bool = True) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"loss.chunk_size: expected a positive integer or null, got {chunk_size}")
        self.chunk_size = chunk_size
        self.bidirectional = bidirectional

    def remote_blocks(self, packed: torch.Tensor) -> Iterable[torch.Tensor]:
        """The other ranks' packed captions; a subclass can feed them from elsewhere (benchmarks)."""
        return ring_exchange(packed, self.bidirectional)

    def forward(
        self,
        image_keys: torch.Tensor,
        image_values: torch.Tensor,
        text_queries: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        *,
        llip_mix: MixFn,
        **_: torch.Tensor,
    ) -> torch.Tensor:
        """keys/values (B, H, K, d), queries (B, H, d), text features (B, D) L2-normalised,
        `logit_scale` the log temperature, `llip_mix` the head's mix (B_i, B_t, D)."""
        if image_keys.shape[0] != text_features.shape[0]:
            raise ValueError(
                f"expected one caption per image, got {image_keys.shape[0]} images, "
                f"{text_features.shape[0]} captions"
            )
        scale = logit_scale.exp()

        def logits(texts: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
            mixed = llip_mix(image_keys, image_values, queries)  # (B_i, chunk, D)
            out = scale * torch.einsum("icd,cd->ic", mixed, texts)
            return out if logit_bias is None else out + logit_bias

        captions = [text_features, text_queries]
        total = sigmoid_ring_loss(logits, captions, self.chunk_size, self.remote_blocks)
        return total / image_keys.shape[0]
