"""The sigmoid pair loss over the global batch, shared by SigLIP and Llip: caption blocks come round the
ring, then all captions are scored against the local images in chunks (a chunk may span blocks).

Every (image i, caption j) pair adds -log sigmoid(z_ij * logit_ij), z = +1 on matching pairs and -1
elsewhere. A logit function maps the image-side tensors and one chunk of caption-side tensors to a
(B_images, chunk) block of logits; SigLIP's is a scaled dot product, Llip's a caption-conditioned mix.

Memory: a chunk's logits and intermediates live only while that chunk is processed. Rather than keeping
them for backward (dense) or recomputing them there (checkpointing), the gradient of each chunk's loss
with respect to its inputs is taken right after its forward and summed into one buffer per input;
backward scales these sums by the incoming gradient. Peak memory beyond the inputs and their gradients
is one chunk's worth, O(B_images x chunk), and each pair is computed forward and backward once, as in
the dense loss. The received caption blocks are inputs, kept until backward either way.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

import einops
import torch
import torch.nn.functional as F
from torch import nn

from vlmtrain.losses.collectives import ring_exchange

# (image-side tensors, caption-side chunk tensors) -> (B_images, chunk) logits
LogitFn = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]


def pair_loss_sum(logits: torch.Tensor, positive_offset: int | None) -> torch.Tensor:
    """Sum of -log sigmoid(z * logits): z = +1 on (offset + j, j) when an offset is given, else -1."""
    signed = -logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32
    if positive_offset is not None:
        signed.diagonal(-positive_offset).neg_()  # flip the matching pairs back to +logit
    return -F.logsigmoid(signed).sum()


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, ...) tensors -> one (B, sum of sizes) tensor, so a ring hop sends one message."""
    if len(tensors) == 1:  # a view, where einops.pack would copy
        return tensors[0].flatten(1)
    return einops.pack(tensors, "b *")[0]


def unpack(packed: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Inverse of `pack`, given each tensor's per-row shape (views where the rows allow)."""
    return einops.unpack(packed, list(shapes), "b *")


def autocast_operands(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Matrix-product operands in the autocast dtype when autocast is on: cast once here rather than by
    autocast in every chunk (same values), and the caption blocks travel the ring at half the size."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return list(tensors)
    return [t.to(torch.get_autocast_dtype(device)) for t in tensors]


def _sum_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def _leaf(tensor: torch.Tensor, needs_grad: bool) -> torch.Tensor:
    return tensor.detach().requires_grad_(needs_grad)


class _CaptionRows:
    """The packed caption blocks as one sequence of caption rows, the local block first, so that a
    chunk may span blocks: few large chunks run faster than many small ones."""

    def __init__(self, blocks: Sequence[torch.Tensor]) -> None:
        self.blocks = blocks
        self.starts = list(itertools.accumulate((b.shape[0] for b in blocks), initial=0))
        self.num_local, self.total = blocks[0].shape[0], self.starts[-1]

    def chunks(self, chunk_size: int | None) -> Iterator[tuple[int, int]]:
        size = chunk_size or self.total
        return ((start, min(start + size, self.total)) for start in range(0, self.total, size))

    def pieces(self, start: int, stop: int) -> list[tuple[int, slice, slice]]:
        """(block, its rows, the same rows within the chunk) for each block rows [start, stop) touch."""
        out = []
        for index, (first, end) in enumerate(zip(self.starts, self.starts[1:])):
            low, high = max(start, first), min(stop, end)
            if low < high:
                out.append((index, slice(low - first, high - first), slice(low - start, high - start)))
        return out

    def take(self, pieces: list[tuple[int, slice, slice]]) -> torch.Tensor:
        """The rows `pieces` names, as one tensor (a copy only when they span blocks)."""
        parts = [self.blocks[index][rows] for index, rows, _ in pieces]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def positive_offset(self, start: int) -> int | None:
        """Caption row r < num_local matches image r: a chunk's matching pairs lie on this diagonal."""
        return start if start < self.num_local else None


class _ChunkedPairLoss(torch.autograd.Function):
    """Loss summed over chunks of all the captions; input gradients taken chunk by chunk.

    Inputs: the image-side tensors, then the packed caption blocks, the local block first."""

    @staticmethod
    def forward(ctx, logit_fn, shapes, chunk_size, num_images, *tensors):  # noqa: ANN001, ANN205
        needs = ctx.needs_input_grad[4:]
        images = [_leaf(t, n) for t, n in zip(tensors[:num_images], needs)]
        rows = _CaptionRows([t.detach() for t in tensors[num_images:]])
        # image gradients summed over chunks in fp32 even for bf16 inputs; autograd casts them back
        grads = [torch.zeros_like(t, dtype=_sum_dtype(t)) if n else None for t, n in zip(tensors, needs)]
        total = 0.0
        for start, stop in rows.chunks(chunk_size):
            pieces = rows.pieces(start, stop)
            chunk = _leaf(rows.take(pieces), any(needs[num_images + i] for i, _, _ in pieces))
            with torch.enable_grad():
                logits = logit_fn(images, unpack(chunk, shapes))
                loss = pair_loss_sum(logits, rows.positive_offset(start))
            wanted = [t for t in (*images, chunk) if t.requires_grad]
            found = iter(torch.autograd.grad(loss, wanted) if wanted else ())
            for buffer, t in zip(grads, images):
                if t.requires_grad:
                    buffer += next(found)
            if chunk.requires_grad:
                chunk_grad = next(found)
                for index, block_rows, chunk_rows in pieces:
                    if (buffer := grads[num_images + index]) is not None:
                        buffer[block_rows] = chunk_grad[chunk_rows]
            total = total + loss.detach()
        ctx.grads = grads
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        grads, ctx.grads = ctx.grads, None
        scaled = [g if g is None else g.mul_(grad_output) for g in grads]  # in place: no second copy
        return (None, None, None, None, *scaled)


def sigmoid_ring_loss(
    logit_fn: LogitFn,
    images: Sequence[torch.Tensor],
    captions: Sequence[torch.Tensor],
    chunk_size: int | None,
    remote_blocks: Callable[[torch.Tensor], Iterable[torch.Tensor]],
) -> torch.Tensor:
    """Pair-loss sum of the local images against the local captions and every other rank's captions.

    `captions` are the caption-side tensors (B, ...) `logit_fn` takes in chunks; `remote_blocks` maps
    their packed form to the other ranks' packed blocks (normally the ring exchange).
    """
    local = pack(captions)
    blocks = [local, *remote_blocks(local)]
    shapes = [t.shape[1:] for t in captions]
    tensors = [*images, *blocks]
    if not torch.is_grad_enabled():  # nothing will be differentiated: take no chunk gradients either
        tensors = [t.detach() for t in tensors]
    return _ChunkedPairLoss.apply(logit_fn, shapes, chunk_size, len(images), *tensors)


class RingSigmoidLoss(nn.Module):
    """What the sigmoid losses share: caption blocks passed round the ring, scored in chunks.

    `chunk_size`: captions per chunk, counted over all ranks' captions (None: all in one chunk).
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
