"""SigLIP: an independent binary (sigmoid) loss on every image-caption pair of the global batch.

    L = -1/N * sum_{i,j} log sigmoid(z_ij * (t * x_i . y_j + b)),   z_ij = +1 if i == j else -1

over the N = W*B pairs' images i and captions j, as in the SigLIP paper and open_clip. Rank r sums its B
images against all N captions and divides by B, so the ranks' losses sum to W * L: the convention of
`vlmtrain.losses.clip`, under which DDP's averaging gives exactly the single-process gradient.

Captions reach the images one block at a time around the ring (`collectives.ring_exchange`), and each
block is cut into chunks of captions whose logits are recomputed in backward instead of stored, so peak
memory is O(B x chunk) however large the global batch. `sigmoid_ring_loss` is the driver, shared with Llip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmtrain.losses.collectives import ring_exchange

LogitFn = Callable[..., torch.Tensor]  # caption-side chunk tensors -> (B_images, chunk) logits


def pair_loss_sum(logits: torch.Tensor, positive_offset: int | None) -> torch.Tensor:
    """Sum of -log sigmoid(z * logits): z = +1 on (offset + j, j) when an offset is given, else -1."""
    signed = -logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32
    if positive_offset is not None:
        signed.diagonal(-positive_offset).neg_()  # flip the matching pairs back to +logit
    return -F.logsigmoid(signed).sum()


def _chunk_loss(logit_fn: LogitFn, positive_offset: int | None, *chunk: torch.Tensor) -> torch.Tensor:
    return pair_loss_sum(logit_fn(*chunk), positive_offset)


def block_loss(
    logit_fn: LogitFn, captions: Sequence[torch.Tensor], chunk_size: int | None, local: bool
) -> torch.Tensor:
    """Loss summed over one block of captions, chunk by chunk, each chunk recomputed in backward.

    Only the chunk inputs (views of `captions`) are kept for backward, never a chunk's logits.
    On the local block caption j matches image j, i.e. image (start + j) of a chunk starting at start.
    """
    rows = captions[0].shape[0]
    size = chunk_size or rows
    return sum(
        checkpoint(
            _chunk_loss,
            logit_fn,
            start if local else None,
            *[c[start : start + size] for c in captions],
            use_reentrant=False,
            preserve_rng_state=False,  # nothing random inside a chunk
        )
        for start in range(0, rows, size)
    )


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, ...) tensors -> one (B, sum of sizes) tensor, so a ring hop sends one message."""
    if len(tensors) == 1:
        return tensors[0].flatten(1)
    return torch.cat([t.flatten(1) for t in tensors], dim=1)


def unpack(packed: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    sizes = [t[0].numel() for t in like]
    parts = packed.split(sizes, dim=1)
    return [p.reshape(-1, *t.shape[1:]) for p, t in zip(parts, like)]


def sigmoid_ring_loss(
    logit_fn: LogitFn,
    captions: Sequence[torch.Tensor],
    chunk_size: int | None,
    remote_blocks: Callable[[torch.Tensor], Iterable[torch.Tensor]],
) -> torch.Tensor:
    """Pair-loss sum of the local images against the local captions, then every other rank's captions.

    `captions` are the caption-side tensors `logit_fn` takes (B, ...); `remote_blocks` maps their packed
    form to the other ranks' packed blocks (normally the ring exchange).
    """
    total = block_loss(logit_fn, captions, chunk_size, local=True)
    for block in remote_blocks(pack(captions)):
        total = total + block_loss(logit_fn, unpack(block, captions), chunk_size, local=False)
    return total


class RingSigmoidLoss(nn.Module):
    """What the sigmoid losses share: caption blocks passed round the ring, scored in chunks.

    `chunk_size`: captions per chunk (None: one chunk per ring block, i.e. B captions).
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
        _check_pairs(image_features, text_features)
        scale = logit_scale.exp()

        def logits(texts: torch.Tensor) -> torch.Tensor:
            out = scale * image_features @ texts.T
            return out if logit_bias is None else out + logit_bias

        total = sigmoid_ring_loss(logits, [text_features], self.chunk_size, self.remote_blocks)
        return total / image_features.shape[0]


def _check_pairs(images: torch.Tensor, texts: torch.Tensor) -> None:
    if images.shape[0] != texts.shape[0]:
        raise ValueError(
            f"expected one caption per image, got {images.shape[0]} images, {texts.shape[0]} captions"
        )
