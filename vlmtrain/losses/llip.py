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

from collections.abc import Callable

import torch

from vlmtrain.losses.siglip import RingSigmoidLoss, sigmoid_ring_loss

MixFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LlipLoss(RingSigmoidLoss):
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
