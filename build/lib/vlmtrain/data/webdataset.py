"""The training stream: shards split over ranks and workers, shuffled, decoded, tokenised, batched.

Each worker reads its own shards in an order fixed by (seed, epoch), shuffles samples in a seeded
buffer and emits whole batches, so a (seed, epoch) pair always yields the same batches.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vlmtrain.data.shards import read_shard
from vlmtrain.data.transforms import decode_captions, decode_image

log = logging.getLogger(__name__)


class ShardStream(IterableDataset):
    """Yields (images, tokens) batches; iterate once per epoch after `set_epoch`."""

    def __init__(
        self,
        shards: list[str],
        transform: Callable,
        tokenizer: Callable[[list[str]], torch.Tensor],
        batch_size: int,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        sizes: dict[str, int] | None = None,
    ) -> None:
        self.shards, self.transform, self.tokenizer = shards, transform, tokenizer
        self.sizes = sizes or {}  # samples per shard (sizes.json): a shard that yields fewer is reported
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_shards(self) -> tuple[list[str], int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = list(self.shards)
        random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        return order[slot::slots], slot

    def _raw_samples(self, shards: list[str]) -> Iterator[tuple[str, dict]]:
        for shard in shards:
            count = 0
            for raw in read_shard(shard, on_error=_skip(shard)):
                count += 1
                yield shard, raw
            if count < self.sizes.get(shard, 0):  # a tar cut short loses its tail without an error
                log.warning(
                    "%s: %d samples read, sizes.json lists %d (truncated or unreadable shard)",
                    shard,
                    count,
                    self.sizes[shard],
                )

    def _shuffled(self, samples: Iterator, rng: random.Random) -> Iterator:
        """Seeded buffer shuffle of the still-encoded samples (small; decoded images would not be)."""
        buffer: list = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _decoded(self, samples: Iterator[tuple[str, dict]], rng: random.Random) -> Iterator:
        for shard, raw in samples:
            try:
                image = self.transform(decode_image(raw))
                caption = rng.choice(decode_captions(raw))
            except Exception as exc:  # a corrupt sample is skipped, never fatal
                log.warning("skipping sample %s in %s: %s", raw.get("__key__"), shard, exc)
                continue
            yield image, caption

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shards, slot = self._my_shards()
        rng = random.Random(f"{self.seed}-{self.epoch}-{slot}")
        batch: list = []
        for sample in self._decoded(self._shuffled(self._raw_samples(shards), rng), rng):
            batch.append(sample)
            if len(batch) == self.batch_size:
                images, texts = zip(*batch)
                yield torch.stack(images), self.tokenizer(list(texts))
                batch = []


def _skip(shard: str) -> Callable[[Exception], bool]:
    def handler(exc: Exception) -> bool:
        log.warning("skipping unreadable data in %s: %s", shard, exc)
        return True

    return handler
