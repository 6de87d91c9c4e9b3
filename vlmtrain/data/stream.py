"""The training stream: endless batches per (rank, worker) slot, each carrying the cursor that resumes it.

Every slot reads its own shards of each source (vlmtrain.data.cursor), mixes the sources by weight,
shuffles still-encoded samples in a seeded buffer, decodes, tokenises and batches. A batch holds its
samples' keys and the slot's cursor after it, so whoever hands the batch out knows how to resume right
after it. There is no epoch boundary in the stream: a pass over the shards runs on into the next, so no
sample is dropped and every slot can give every step a batch (epochs are counted in samples by the loader).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from vlmtrain.data.buffers import BatchBuffers
from vlmtrain.data.cursor import Cursor
from vlmtrain.data.slot import SlotReader, SlotSettings


@dataclass
class BatchMeta:
    """What travels with a batch besides its tensors (left alone by collation and pinning)."""

    slot: int
    keys: list[str]
    cursor: Cursor  # the slot's state after this batch: resuming from it yields the next one
    buffer: tuple[int, int] = (0, -1)  # (worker, index) of the reused buffer holding the images; -1: none


class ShardStream(IterableDataset):
    """Yields {"images": uint8 (B, 3, H, W), "tokens", "meta": BatchMeta} forever.

    `sources` holds each source's shard list, `weights` their mixing weights. Inside a DataLoader worker w
    of W, the stream plays slot rank * W + (w + rotation) % W, starting from `cursors[slot]` if given.
    Everything after `batch_size` is a keyword."""

    def __init__(
        self,
        sources: list[list[str]],
        transform: Callable,
        tokenizer: Callable[[list[str]], torch.Tensor],
        batch_size: int,
        *,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        weights: list[float] | None = None,
        resampled: bool = False,
        sizes: dict[str, int] | None = None,
        read_options: dict | None = None,
    ) -> None:
        self.sources, self.transform, self.tokenizer = sources, transform, tokenizer
        self.weights = list(weights or [1.0] * len(sources))
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.rank, self.world_size, self.resampled = rank, world_size, resampled
        self.sizes = sizes or {}  # samples per shard (sizes.json): a shard that yields fewer is reported
        self.read_options = read_options or {}
        self.cursors: dict[int, Cursor] = {}  # where each slot starts (a resumed run)
        self.rotation = 0  # after n batches handed out, worker w plays logical worker (w + n) % W
        self.buffers: BatchBuffers | None = None  # reused shared memory for the workers' batches

    def slot_settings(self) -> SlotSettings:
        return SlotSettings(
            sources=self.sources,
            transform=self.transform,
            weights=self.weights,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            resampled=self.resampled,
            sizes=self.sizes,
            read_options=self.read_options,
        )

    def slot_batches(self, slot: int, slots: int, cursor: Cursor | None = None) -> Iterator[dict]:
        """One slot's batches, from `cursor` (default: the slot's start)."""
        start = cursor or Cursor.start(len(self.sources), self.seed, slot)
        reader = SlotReader(self.slot_settings(), slot, slots, start)
        samples = reader.samples()
        info = get_worker_info()
        in_worker = info is not None
        while True:
            outer_rng = None if in_worker else torch.get_rng_state()  # seeding must not touch the trainer's
            keys, images, texts = zip(*(next(samples) for _ in range(self.batch_size)))
            if outer_rng is not None:
                torch.set_rng_state(outer_rng)
            meta = BatchMeta(slot, list(keys), reader.cursor())
            if in_worker and self.buffers is not None:
                stacked, index = self.buffers.stack(info.id, images)
                meta.buffer = (info.id, index)
            else:  # in a worker: into fresh shared memory, so sharing it copies nothing; else a stack
                stacked = default_collate(images)
            yield {"images": stacked, "tokens": self.tokenizer(list(texts)), "meta": meta}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slot = self.rank * workers + (worker + self.rotation) % workers
        return self.slot_batches(slot, self.world_size * workers, self.cursors.get(slot))
