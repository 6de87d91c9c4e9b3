"""A data position carried over to another number of slots (ranks x data workers): the run resumed on
fewer or more GPUs, or with another `data.num_workers`, still trains each sample of a pass exactly once.

What the old slots' cursors (vlmtrain.data.cursor) say, per source read in order: a slot has taken every
sample of its sequence before index i, and of shard i those before the offset, except the samples still
in its shuffle buffer, which were read but not trained. A shuffle buffer cannot be handed to another slot
as it is (its content is drawn by the slot's RNGs), so it is not carried over: its samples go back into
the remainder instead. The remainder of a pass is then, over all old slots: the shards (or parts of
shards, after an earlier re-partition) they had not reached, the rest of each shard they were reading,
and the single samples their buffers held. Passes before the lowest one any slot still had samples of
are done; passes after the highest one any slot had read from are untouched.

The new slots share the remainder, pass by pass, as pieces: a shard index, a range of sample offsets
and the single offsets before it (`Piece`). With every shard's size known (sizes.json), each new slot
gets a number of samples in proportion to the batches it hands out in the steps left of the epoch (the
first pass) or of a whole epoch (a later one), and a shard is split between slots at a sample offset:
when the epoch is a pass (shards of equal size that divide into whole batches per slot) the interrupted
epoch ends with every slot at the end of its share, and trained each sample exactly once. Without sizes,
whole pieces go to the slots in turn: still each sample once per pass, the epoch's end less even. After
its pieces every new slot reads the passes from the next untouched one on, in the new slots' order.
A piece is read from its shard's beginning, past the samples that are not its own (raw tar members, never
decoded), as a restore reads up to an offset; the cursor keeps the plan, so a later resume, on the same
layout or yet another, continues from it.

Resampled sources have no passes (shards are drawn with replacement): each new slot draws its shards from
indices past any an old slot drew. The bad-sample counts carry over, summed into the first slot, and the
RNGs that mix sources and pop the buffer are seeded from (seed, slot, batches handed out).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

from vlmtrain.data.accounting import total, worst_shards
from vlmtrain.data.cursor import Cursor, Piece, Plan, ShardOrder, rng_state


@dataclass(frozen=True)
class Layout:
    """Slots as ranks x data workers (slot = rank * workers + worker)."""

    ranks: int
    workers: int

    @property
    def slots(self) -> int:
        return self.ranks * self.workers


@dataclass(frozen=True)
class Reading:
    """What the slots read: each source's shards, samples per shard (empty: unknown), seed, resampling."""

    sources: list[list[str]]
    sizes: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    resampled: bool = False


def reshard(
    cursors: dict[int, Cursor],
    old: Layout,
    new: Layout,
    reading: Reading,
    *,
    batches: int,
    steps_per_epoch: int,
) -> dict[int, Cursor]:
    """Every new slot's cursor, from every old slot's; `batches` handed out per rank so far (the steps)."""
    old_cursors = [
        cursors.get(slot) or Cursor.start(len(reading.sources), reading.seed, slot)
        for slot in range(old.slots)
    ]
    weights = [_window_batches(new, batches, steps_per_epoch, k) for k in range(2)]
    positions, plans = [], []
    for source, shards in enumerate(reading.sources):
        if reading.resampled:
            drawn = max(cursor.sources[source][0] for cursor in old_cursors) + 1
            positions.append([drawn, 0, 0])
            plans.append([Plan() for _ in range(new.slots)])
            continue
        left, base = remainder(old_cursors, old.slots, source, reading)
        sizes = [reading.sizes.get(shard) for shard in shards]
        plans.append(share(left, base, weights, sizes))
        positions.append([0, 0, 0])
    bad = total([cursor.bad for cursor in old_cursors])
    worst = worst_shards([cursor.worst for cursor in old_cursors])
    counter = max(cursor.counter for cursor in old_cursors)
    return {
        slot: Cursor(
            sources=[list(position) for position in positions],
            mix=rng_state(random.Random(f"{reading.seed}-{slot}-mix-{batches}")),
            pop=rng_state(random.Random(f"{reading.seed}-{slot}-pop-{batches}")),
            counter=counter,
            bad=dict(bad) if slot == 0 else {name: 0 for name in bad},
            worst=dict(worst) if slot == 0 else {},
            plans=[] if reading.resampled else [per_slot[slot] for per_slot in plans],
        )
        for slot in range(new.slots)
    }


def remainder(
    cursors: list[Cursor], slots: int, source: int, reading: Reading
) -> tuple[dict[int, list[Piece]], int]:
    """What the old slots left of one source: pieces by pass, and the first pass none of them touched."""
    orders = [
        ShardOrder(
            reading.sources[source], reading.seed, source, slot, slots, False, plan=cursor.plan(source)
        )
        for slot, cursor in enumerate(cursors)
    ]
    buffered = [_buffered(cursor, source) for cursor in cursors]
    reached = [order.pass_of(cursor.sources[source][0]) for order, cursor in zip(orders, cursors)]
    lowest = min(
        min([n, *(order.pass_of(j) for j in held)]) for order, held, n in zip(orders, buffered, reached)
    )
    # the passes before a plan's base were begun by an earlier layout: what is left of them is its pieces
    highest = max(*reached, *(order.plan.base - 1 for order in orders))
    left: dict[int, list[Piece]] = defaultdict(list)
    for order, cursor, held in zip(orders, cursors, buffered):
        i, offset, _ = cursor.sources[source]
        for number in range(lowest, highest + 1):
            for j, piece in order.entries(number):
                rest = piece if j > i else _unread(piece, offset if j == i else None, held.get(j, set()))
                if rest is not None:
                    left[number].append(rest)
    return dict(left), highest + 1


def _buffered(cursor: Cursor, source: int) -> dict[int, set[int]]:
    """The samples of `source` in the slot's shuffle buffer (read, not trained): offsets by index."""
    held: dict[int, set[int]] = defaultdict(set)
    for s, j, offset in cursor.refs():
        if s == source:
            held[j].add(offset)
    return held


def _unread(piece: Piece, offset: int | None, held: set[int]) -> Piece | None:
    """What of `piece` is not trained: from `offset` on (None: the slot is past it) and the `held` ones."""
    if offset is None:
        return Piece(piece.number, piece.shard, 0, 0, tuple(sorted(held))) if held else None
    start = max(piece.start, offset)
    extras = sorted(held | {at for at in piece.extras if at >= offset})
    if piece.end >= 0 and start >= piece.end:
        return Piece(piece.number, piece.shard, 0, 0, tuple(extras)) if extras else None
    return Piece(piece.number, piece.shard, start, piece.end, tuple(extras))


def share(
    left: dict[int, list[Piece]], base: int, weights: list[list[int]], sizes: list[int | None]
) -> list[Plan]:
    """The new slots' plans: each pass's pieces shared in proportion to `weights` (the first pass by
    weights[0], later ones by weights[1]), split at sample offsets when every size is known."""
    slots = len(weights[0])
    pieces: list[list[Piece]] = [[] for _ in range(slots)]
    for k, number in enumerate(sorted(left)):
        known = all(sizes[piece.shard] is not None or _bounded(piece) for piece in left[number])
        if known:
            counts = apportion(sum(_count(p, sizes) for p in left[number]), weights[min(k, 1)])
            parts = _fill(left[number], counts, sizes)
        else:
            parts = [left[number][slot::slots] for slot in range(slots)]
        for slot in range(slots):
            pieces[slot] += parts[slot]
    return [Plan(base, pieces[slot]) for slot in range(slots)]


def _bounded(piece: Piece) -> bool:
    return piece.end >= 0


def _count(piece: Piece, sizes: list[int | None]) -> int:
    return piece.count(sizes[piece.shard] if sizes[piece.shard] is not None else piece.stop)


def apportion(count: int, weights: list[int]) -> list[int]:
    """`count` split in proportion to `weights` (largest remainders), summing to `count` exactly."""
    whole = sum(weights) or 1
    shares = [count * w // whole for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda n: (-(count * weights[n] % whole), n))
    for n in by_remainder[: count - sum(shares)]:
        shares[n] += 1
    return shares


def _fill(pieces: list[Piece], counts: list[int], sizes: list[int | None]) -> list[list[Piece]]:
    """The pieces dealt to slots in order, each slot taking `counts[slot]` samples, a piece split where a
    slot's count ends."""
    parts: list[list[Piece]] = [[] for _ in counts]
    queue, slot, wanted = list(reversed(pieces)), 0, counts[0] if counts else 0
    while queue and slot < len(counts):
        if wanted == 0:
            slot += 1
            wanted = counts[slot] if slot < len(counts) else 0
            continue
        piece = queue.pop()
        size = _count(piece, sizes)
        if size <= wanted:
            parts[slot].append(piece)
            wanted -= size
            continue
        head, tail = split(piece, wanted)
        parts[slot].append(head)
        queue.append(tail)
        wanted = 0
    for piece in queue:  # only where the counts fall short (never: they sum to the pieces' samples)
        parts[-1].append(piece)
    return parts


def split(piece: Piece, count: int) -> tuple[Piece, Piece]:
    """The piece's first `count` samples (in shard order) and the rest."""
    number, shard = piece.number, piece.shard
    if count <= len(piece.extras):
        head = Piece(number, shard, 0, 0, piece.extras[:count])
        return head, Piece(number, shard, piece.start, piece.end, piece.extras[count:])
    cut = piece.start + count - len(piece.extras)
    return Piece(number, shard, piece.start, cut, piece.extras), Piece(number, shard, cut, piece.end)


def _window_batches(layout: Layout, batches: int, steps_per_epoch: int, later: int) -> list[int]:
    """The batches each slot hands out in the rest of the current epoch (`later` 0), or in the whole next
    one (1): a rank's batch n comes from its worker n % workers."""
    end = (batches // steps_per_epoch + 1) * steps_per_epoch
    first, last = (batches, end) if not later else (end, end + steps_per_epoch)
    per_worker = [
        len(range(first + (w - first) % layout.workers, last, layout.workers)) for w in range(layout.workers)
    ]
    return per_worker * layout.ranks
