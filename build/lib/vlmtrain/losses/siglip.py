"""SigLIP: an independent binary (sigmoid) loss on every image-caption pair of the global batch.

    L = -1/N * sum_{i,j} log sigmoid(z_ij * (t * x_i . y_j + b)),   z_ij = +1 if i == j else -1

over the N = W*B pairs' images i and captions j, as in the SigLIP paper and open_clip. Rank r sums its B
images against all N captions and divides by B, so the ranks' losses sum to W * L: the convention of
`vlmtrain.losses.clip`, under which DDP's averaging gives exactly the single-process gradient.

Captions reach the images one block at a time around the ring and are scored in chunks
(`vlmtrain.losses.pairwise`), so peak memory is O(B x chunk) however large the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmtrain.losses.pairwise import RingSigmoidLoss, autocast_operands, sigmoid_ring_loss


def _siglip_logits(images: Sequence[torch.Tensor], chunk: Sequence[torch.Tensor]) -> torch.Tensor:
    features, scale, *bias = images
    products = features @ chunk[0].T
    logits = scale * products.to(torch.promote_types(products.dtype, torch.float32))
    return logits + bias[0] if bias else logits


class SigLipLoss(RingSigmoidLoss):
    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        **_: torch.Tensor,
    ) -> torch.Tensor:
        """Features L2-normalised (B, D); `logit_scale` the log temperature; `logit_bias` optional."""
        check_pairs(image_features, text_features)
        image_features, text_features = autocast_operands(image_features, text_features)
        images = [image_features, logit_scale.exp()] + ([] if logit_bias is None else [logit_bias])
        total = sigmoid_ring_loss(
            _siglip_logits, images, [text_features], self.chunk_size, self.remote_blocks
        )
        return total / image_features.shape[0]


def check_pairs(images: torch.Tensor, texts: torch.Tensor) -> None:
    if images.shape[0] != texts.shape[0]:
        raise ValueError(
            f"expected one caption per image, got {images.shape[0]} images, {texts.shape[0]} captions"
        )
