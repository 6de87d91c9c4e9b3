"""A slot's position in its endless stream: a `Cursor`, saved as plain Python values (`to_dict`; a
checkpoint loads it with `weights_only=True`) and read back with `Cursor.from_dict`, which also reads the
dicts older checkpoints hold.

A slot is one (rank, data worker) pair: slot = rank * workers + worker, of slots = world_size * workers.
For each source the slot's shards form an endless sequence, a pure function of an index i = 0, 1, 2, ...:
- in order: pass p = i // k reads `shuffle(shards, seed, p)[slot::slots]` (k shards per pass, the same
  for every pass), and a pass runs on into the next one, so nothing is dropped at a pass boundary;
- resampled: shard i is a seeded draw with replacement from (seed, slot, source, i).
A run resumed on another ranks x workers (vlmtrain.data.reshard) prefixes the sequence with a plan:
`pieces`, the parts of shards left of the passes the old slots were in (each a shard, a range of sample
offsets and single offsets before it), then the passes from `base` on, in the new slots' order.
So a source's position is (i, sample offset in shard i). The cursor adds what else the next batch
depends on: the RNG that mixes the sources, the shuffle buffer as references (source, i, offset) to
still-encoded samples (never their bytes), the RNG that pops it, a sample counter that seeds each
sample's own randomness (caption choice, augmentation), and the cumulative bad-sample counts.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Any

# Why a sample was skipped, or a shard cut short (`truncated`: read in part) or not read (`unreadable`):
REASONS = ("image", "caption", "truncated", "unreadable")


@dataclass(frozen=True)
class Piece:
    """Part of a shard that one pass of a slot reads: the samples at `extras` and at offsets from `start`
    up to `end` (-1: the shard's end); the others are read past, not taken."""

    number: int  # the pass it belongs to
    shard: int  # its index in the source's shard list
    start: int = 0
    end: int = -1
    extras: tuple[int, ...] = ()

    def takes(self, offset: int) -> bool:
        return self.start <= offset and (self.end < 0 or offset < self.end) or offset in self._extras

    @functools.cached_property
    def _extras(self) -> frozenset[int]:
        return frozenset(self.extras)

    @property
    def stop(self) -> int:
        """The offset after its last sample (-1: the shard's end)."""
        return -1 if self.end < 0 else max(self.end, self.extras[-1] + 1 if self.extras else 0)

    def count(self, size: int) -> int:
        """Samples it takes from a shard of `size` samples."""
        end = size if self.end < 0 else min(self.end, size)
        return len(self.extras) + max(0, end - self.start)

    def to_list(self) -> list[int]:
        return [self.number, self.shard, self.start, self.end, *self.extras]

    @classmethod
    def from_list(cls, values: list) -> Piece:
        number, shard, start, end, *extras = (int(v) for v in values)
        return cls(number, shard, start, end, tuple(extras))


@dataclass
class Plan:
    """A source's sequence for one slot before its passes: `pieces`, then pass `base` on."""

    base: int = 0
    pieces: list[Piece] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "pieces": [piece.to_list() for piece in self.pieces]}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Plan:
        return cls(int(saved["base"]), [Piece.from_list(values) for values in saved["pieces"]])


@functools.lru_cache(maxsize=16)
def pass_order(count: int, seed: int, source: int, number: int) -> tuple[int, ...]:
    """The shard indices of a source's pass `number`, shuffled (every slot's share is a slice of it)."""
    order = list(range(count))
    random.Random(f"{seed}-{source}-{number}").shuffle(order)
    return tuple(order)


class ShardOrder:
    """The shard sequence one slot reads from one source."""

    def __init__(
        self,
        shards: list[str],
        seed: int,
        source: int,
        slot: int,
        slots: int,
        resampled: bool,
        *,
        plan: Plan | None = None,
    ) -> None:
        self.shards, self.seed, self.source = shards, seed, source
        self.slot, self.slots, self.resampled = slot, slots, resampled
        self.plan = plan or Plan()
        self.per_pass = len(range(slot, len(shards), slots))  # k: the same in every pass
        self._pass: tuple[int, tuple[int, ...]] = (-1, ())  # the pass last read: its number, its shards

    def __getitem__(self, i: int) -> str:
        if self.resampled:
            return random.Random(f"{self.seed}-{self.slot}-{self.source}-{i}").choice(self.shards)
        return self.shards[self.entry(i).shard]

    def entry(self, i: int) -> Piece:
        """What index i reads: a piece of the plan, or a whole shard of a pass."""
        pieces = self.plan.pieces
        if i < len(pieces):
            return pieces[i]
        number, index = divmod(i - len(pieces), self.per_pass)
        number += self.plan.base
        if self._pass[0] != number:
            order = pass_order(len(self.shards), self.seed, self.source, number)
            self._pass = (number, order[self.slot :: self.slots])
        return Piece(number, self._pass[1][index])

    def pass_of(self, i: int) -> int:
        return 0 if self.resampled else self.entry(i).number

    def entries(self, number: int) -> list[tuple[int, Piece]]:
        """The indices of pass `number` in this sequence, with what each reads."""
        found = [(i, piece) for i, piece in enumerate(self.plan.pieces) if piece.number == number]
        if number >= self.plan.base:
            first = len(self.plan.pieces) + (number - self.plan.base) * self.per_pass
            found += [(i, self.entry(i)) for i in range(first, first + self.per_pass)]
        return found

    def pass_length(self) -> int:
        """Shards in a row that may all be unreadable before the source is declared empty."""
        return len(self.shards) if self.resampled else self.per_pass + len(self.plan.pieces)


Ref = tuple[int, int, int]  # a buffered sample: (source, shard index i, sample offset)


def empty_counts() -> dict[str, int]:
    return {reason: 0 for reason in REASONS} | {"samples_read": 0}


@dataclass
class Cursor:
    """Where a slot is: what the next batch it yields depends on, and its cumulative bad-sample counts."""

    sources: list[list[int]]  # per source: [shard index i, sample offset, shard flagged bad]
    mix: list  # the state of the RNG that draws the source of each sample (`rng_state`)
    pop: list  # the state of the RNG that pops the shuffle buffer
    buffer: list[int] = field(default_factory=list)  # (source, i, offset) per buffered sample, one flat list
    counter: int = 0  # samples taken from the buffer so far
    bad: dict[str, int] = field(default_factory=empty_counts)  # samples read, bad ones by reason
    worst: dict[str, int] = field(default_factory=dict)  # url -> bad samples, the worst shards only
    plans: list[Plan] = field(default_factory=list)  # per source, after a re-partition; none: passes from 0

    @classmethod
    def start(cls, sources: int, seed: int, slot: int) -> Cursor:
        """Where a slot starts: shard 0 of each source, an empty buffer, RNGs seeded from (seed, slot)."""
        return cls(
            sources=[[0, 0, 0] for _ in range(sources)],
            mix=rng_state(random.Random(f"{seed}-{slot}-mix")),
            pop=rng_state(random.Random(f"{seed}-{slot}-pop")),
        )

    def refs(self) -> list[Ref]:
        return [tuple(self.buffer[n : n + 3]) for n in range(0, len(self.buffer), 3)]

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, dicts and ints, as a checkpoint holds it."""
        return {
            "sources": [list(position) for position in self.sources],
            "mix": self.mix,
            "buffer": list(self.buffer),
            "pop": self.pop,
            "counter": self.counter,
            "bad": dict(self.bad),
            "worst": dict(self.worst),
            "plans": [plan.to_dict() for plan in self.plans],
        }

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Cursor:
        """A saved cursor, also as older checkpoints hold it (the buffer as a list of triples, no `worst` or
        `plans`)."""
        buffer = saved["buffer"]
        if buffer and isinstance(buffer[0], list | tuple):
            buffer = [v for ref in buffer for v in ref]
        return cls(
            sources=[[int(v) for v in position] for position in saved["sources"]],
            mix=saved["mix"],
            pop=saved["pop"],
            buffer=[int(v) for v in buffer],
            counter=int(saved["counter"]),
            bad=empty_counts() | {str(name): int(n) for name, n in saved["bad"].items()},
            worst={str(url): int(n) for url, n in saved.get("worst", {}).items()},
            plans=[Plan.from_dict(plan) for plan in saved.get("plans", [])],
        )

    def plan(self, source: int) -> Plan | None:
        return self.plans[source] if self.plans else None


def rng_state(rng: random.Random) -> list:
    """random.Random's state as lists and ints (tuples may come back as lists after a round trip)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def restore_rng(state: list | tuple) -> random.Random:
    rng = random.Random()
    version, internal, gauss = state
    rng.setstate((int(version), tuple(int(v) for v in internal), gauss))
    return rng


def sample_seed(seed: int, slot: int, counter: int) -> int:
    """The seed of one sample's randomness: the same sample of the same slot always draws the same."""
    return hash((seed, slot, counter)) & 0x7FFF_FFFF_FFFF  # ints hash the same in every process
