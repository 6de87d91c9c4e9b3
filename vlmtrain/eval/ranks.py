"""Evaluation on every rank: each rank runs the model on its share of a set's batches, and the results are
gathered so that every rank ends with what one process computes, in the same order.

Every rank reads the whole set's raw samples (cheap next to decoding and the forward), so every rank
knows each batch and the set's size without talking. The batches are dealt round-robin, one per rank per
round, and each rank decodes and runs only its own. When the last round is short, a rank without a batch
in it runs the round's first batch again and drops the result: every rank runs the same number of
forwards, which a sharded model needs (under FSDP each block's forward gathers its weights from every
rank). A batch holds the same samples at any world size, so the gathered results are one process's, to
the float rounding of the kernels.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import torch.distributed as dist

Batch = TypeVar("Batch")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The default process group's ranks; one rank without a group."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


class Deal(Generic[Batch]):
    """Iterate for this rank's `(batch, own)`: its own batches in order (own=True), then at most one
    padding batch (own=False, whose result is dropped). Append each forward's result (the padding's too)
    to a list, in order, and `gather` it once the iteration is done (a collective)."""

    def __init__(self, batches: Iterable[list], ranks: Ranks) -> None:
        self.batches, self.ranks = batches, ranks
        self.sizes: list[int] = []  # every batch's length, dealt or not

    def __iter__(self) -> Iterator[tuple[list, bool]]:
        rank, world = self.ranks.rank, self.ranks.world
        first = None
        for index, batch in enumerate(self.batches):
            self.sizes.append(len(batch))
            if index % world == 0:
                first = batch
            if index % world == rank:
                yield batch, True
        if self.sizes and (len(self.sizes) - 1) % world < rank:  # the last round ended before our turn
            yield first, False

    def own_count(self, rank: int) -> int:
        return len(range(rank, len(self.sizes), self.ranks.world))

    def gather(self, results: list[torch.Tensor]) -> torch.Tensor:
        """Every batch's result rows, in batch order, on every rank (a collective): `results` are this
        rank's, one tensor per batch it was dealt, in order (the padding's last)."""
        if not results:  # an empty set
            return torch.empty(0)
        mine = self.own_count(self.ranks.rank)
        own = torch.cat(results[:mine]) if mine else results[0][:0]
        world = self.ranks.world
        if world == 1:
            return own
        counts = [sum(self.sizes[r::world]) for r in range(world)]
        padded = own.new_zeros((max(counts), *own.shape[1:]))
        padded[: len(own)] = own
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        offsets, rows = [0] * world, []
        for index, size in enumerate(self.sizes):
            rank = index % world
            rows.append(parts[rank][offsets[rank] : offsets[rank] + size])
            offsets[rank] += size
        return torch.cat(rows)


def batched(items: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    batch: list[Batch] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
