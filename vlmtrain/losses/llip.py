"""Llip: the sigmoid loss on caption-conditioned image embeddings.

For image i and caption j of the global batch the logit is t * <mix(keys_i, values_i, query_j), y_j> + b,
where `mix` is the Llip head's (`vlmtrain.models.llip_head`) with the head's output projection and temperature, and y_j the
caption's L2-normalised text feature; the loss is SigLIP's over these logits (z = +1 on matching pairs),
normalised and distributed the same way (see `vlmtrain.losses.siglip` and `vlmtrain.losses.clip`).

Images (keys and values) stay on their rank; captions (text feature and query, packed into one message)
travel round the ring. The mixed embeddings are B_local x chunk x D per chunk and live only while their
chunk is scored (`vlmtrain.losses.pairwise`), so memory grows only with the caption inputs themselves
(linear in the global batch) instead of B_local x B_global x D.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmtrain.losses.pairwise import RingSigmoidLoss, autocast_operands, sigmoid_ring_loss
from vlmtrain.losses.siglip import check_pairs
from vlmtrain.models.llip_head import mixed_cosine


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
        llip_out_proj: torch.Tensor,
        llip_temperature: float,
        **_: torch.Tensor,
    ) -> torch.Tensor:
        """keys/values (B, H, K, d), queries (B, H, d), text features (B, D) L2-normalised,
        `logit_scale` the log temperature; the head's output projection (H*d, D) and temperature."""
        check_pairs(image_keys, text_features)

        def logits(images: Sequence[torch.Tensor], chunk: Sequence[torch.Tensor]) -> torch.Tensor:
            keys, values, out_proj, scale, *bias = images
            texts, queries = chunk
            out = scale * mixed_cosine(keys, values, queries, texts, out_proj, llip_temperature)
            return out + bias[0] if bias else out

        operands = autocast_operands(image_keys, image_values, llip_out_proj, text_features, text_queries)
        images = [*operands[:3], logit_scale.exp()] + ([] if logit_bias is None else [logit_bias])
        captions = operands[3:]
        total = sigmoid_ring_loss(logits, images, captions, self.chunk_size, self.remote_blocks)
        return total / image_keys.shape[0]
