"""Shared-memory image buffers that data workers stack batches into again and again.

A batch leaves a worker in shared memory. Fresh shared memory for every batch (what DataLoader's
collation does) costs the kernel a page fault and a zeroed page for every 4 KiB of it, in the worker
that writes it: with the copy into it, 0.09 ms of the 1.3 ms a 224 px JPEG sample takes (BENCHMARKS.md,
"JPEG decode"). Reused buffers cost only the copy, 0.01 ms when they are laid out as the images are.

A buffer may be written again only once the main process is done with the batch in it: the loader
marks it free when its consumer asks for the next batch (`TrainLoader(reuse_buffers=True)`, which the
Trainer uses: it never holds a batch past its step). A worker has more buffers than can be in use at
once (the batches prefetched, the one in use, the one being made); should none be free, it stacks into
fresh shared memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import default_collate


class BatchBuffers:
    """`count` reusable buffers per worker. `flags` (shared, made before the workers start) says which
    are free; each worker holds its own buffers, made at its first batches."""

    def __init__(self, workers: int, count: int) -> None:
        self.flags = torch.ones(workers, count, dtype=torch.uint8).share_memory_()
        self.buffers: list[torch.Tensor | None] = [None] * count  # in the worker
        self.turn = 0

    def stack(self, worker: int, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """In a worker: `images` stacked into a free buffer, and its index (-1: fresh memory, to keep)."""
        count = len(self.buffers)
        turns = ((self.turn + j) % count for j in range(count))
        index = next((j for j in turns if self.flags[worker, j]), None)
        if index is None:
            return default_collate(images), -1
        buffer, shape = self.buffers[index], (len(images), *images[0].shape)
        if buffer is None or buffer.shape != shape or buffer.dtype != images[0].dtype:
            buffer = self.buffers[index] = _shared_like(images[0], len(images))
        for row, image in zip(buffer, images):
            row.copy_(image)
        self.flags[worker, index] = 0
        self.turn = index + 1
        return buffer, index

    def release(self, worker: int, index: int) -> None:
        """In the main process: the batch in this buffer is no longer used."""
        if index >= 0:
            self.flags[worker, index] = 1


def _shared_like(image: torch.Tensor, count: int) -> torch.Tensor:
    """Room for `count` images like `image` in shared memory, channels last for (C, H, W) images: what
    decode and resize produce, so each image is copied row by row rather than transposed (BENCHMARKS.md)."""
    if image.dim() != 3:
        return torch.empty(count, *image.shape, dtype=image.dtype).share_memory_()
    channels, height, width = image.shape
    shared = torch.empty(count, height, width, channels, dtype=image.dtype).share_memory_()
    return shared.permute(0, 3, 1, 2)  # (count, C, H, W), channels last in memory
