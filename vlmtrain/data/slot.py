"""One slot's endless stream of decoded samples, resumable from its cursor (vlmtrain.data.cursor).

Reading: per sample, a source is drawn (probability in proportion to its weight) and its next raw sample
joins the shuffle buffer; a seeded pop takes one out, which is decoded (or counted as bad and skipped).
Restoring: each source's current shard is read up to its offset and the shards the buffered references
point into are read again, as raw tar members without decoding, so the cost of a resume is bounded by
the shuffle buffer and the shard size, never by how far into the epoch the run was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from vlmtrain.data.accounting import DataError, Warner, worst_shards
from vlmtrain.data.cursor import Cursor, Piece, Ref, ShardOrder, restore_rng, rng_state, sample_seed
from vlmtrain.data.shards import read_shard
from vlmtrain.data.transforms import decode_captions, transformed_image


@dataclass(frozen=True)
class SlotSettings:
    """What a slot reads and how: the sources' shard lists and mixing weights, the shuffle buffer's size,
    the seed, whether shards are resampled, samples per shard (sizes.json), shard read options, and the
    transform that decodes an image."""

    sources: list[list[str]]
    transform: Callable
    weights: list[float]
    shuffle_buffer: int = 1000
    seed: int = 0
    resampled: bool = False
    sizes: dict[str, int] = field(default_factory=dict)
    read_options: dict = field(default_factory=dict)


class SourceReader:
    """A source's raw samples for one slot, from position (i, offset) on, shard after shard."""

    def __init__(
        self,
        source: int,
        order: ShardOrder,
        position: list[int],
        read: Callable[..., Iterator[dict]],
        *,
        counts: dict[str, int],
        sizes: dict[str, int],
        warn: Warner,
    ) -> None:
        self.source, self.order, self.read, self.counts = source, order, read, counts
        self.sizes, self.warn = sizes, warn
        self.i, self.offset, self.flagged = (int(v) for v in position)
        self.samples: Iterator[dict] | None = None
        self.quiet = False  # re-reading what the cursor already counted

    def position(self) -> list[int]:
        return [self.i, self.offset, self.flagged]

    def open(self, wanted: dict[Ref, dict | None] | None = None) -> None:
        """Open shard i and skip the samples before the offset (taking the buffered ones among them)."""
        self.url = self.order[self.i]
        self.samples, self.quiet = iter(self.read(self.url, self._on_error)), True
        for offset in range(self.offset):
            raw = self._pull()
            if raw is None:
                break
            if wanted is not None and (self.source, self.i, offset) in wanted:
                wanted[(self.source, self.i, offset)] = raw
        self.quiet = False

    def next(self) -> tuple[Ref, dict]:
        for _ in range(self.order.pass_length() + 1):
            piece = self.order.entry(self.i) if not self.order.resampled else None
            while piece is None or piece.stop < 0 or self.offset < piece.stop:
                if self.samples is None:
                    self.open()
                raw = self._pull()
                if raw is None:
                    break
                ref = (self.source, self.i, self.offset)
                self.offset += 1
                if piece is None or piece.takes(ref[2]):  # a re-partitioned shard: only its part is ours
                    return ref, raw
            self._end_of_shard(piece)
        raise DataError(
            f"data source {self.source}: no readable sample in {self.order.pass_length() + 1} shards in a "
            f"row (last {self.url}); check the shards"
        )

    def _pull(self) -> dict | None:
        try:
            return next(self.samples, None)
        except Exception as error:  # an open or read error the reader did not route to on_error
            if not self.quiet and not self.flagged:
                self.warn("unreadable shard %s: %s", self.url, error)
            self._on_error(error)
            return None

    def _on_error(self, error: Exception) -> bool:
        if not self.quiet and not self.flagged:  # read_shard has logged it, naming the shard
            self.flagged = 1
            self.counts["truncated" if self.offset else "unreadable"] += 1
        return True  # go on with what can be read

    def _end_of_shard(self, piece: Piece | None) -> None:
        self.url = self.order[self.i]
        listed = self.sizes.get(self.url, 0)
        if piece is not None and piece.stop >= 0:  # a piece ends where it is told, not at the shard's end
            listed = min(listed, piece.stop)
        if self.offset < listed and not self.flagged:  # a tar cut short may end without an error
            self.flagged = 1
            self.counts["truncated" if self.offset else "unreadable"] += 1
            self.warn(
                "%s: %d samples read, sizes.json lists %d (truncated or unreadable shard)",
                self.url,
                self.offset,
                listed,
            )
        self.i, self.offset, self.flagged, self.samples = self.i + 1, 0, 0, None


class SlotReader:
    """Decoded (key, image, caption) samples of one slot; `cursor()` is the state that produces the next."""

    def __init__(self, settings: SlotSettings, slot: int, slots: int, cursor: Cursor) -> None:
        self.settings, self.slot = settings, slot
        self.counts = dict(cursor.bad)
        self.worst = dict(cursor.worst)  # url -> bad samples
        self.warn = Warner()
        options = settings.read_options
        read = lambda url, on_error: read_shard(url, on_error=on_error, **options)  # noqa: E731
        self.readers = [
            SourceReader(
                source,
                ShardOrder(
                    shards, settings.seed, source, slot, slots, settings.resampled, plan=cursor.plan(source)
                ),
                position,
                read,
                counts=self.counts,
                sizes=settings.sizes,
                warn=self.warn,
            )
            for source, (shards, position) in enumerate(zip(settings.sources, cursor.sources))
        ]
        self.mix, self.pop = restore_rng(cursor.mix), restore_rng(cursor.pop)
        self.counter, self.plans = cursor.counter, cursor.plans
        self.groups: dict[int, list[tuple[Ref, dict]]] = {}  # the shuffle buffer, by pass (see _pass)
        for ref, raw in self._restore_buffer(cursor.refs(), read):
            self.groups.setdefault(self._pass(ref), []).append((ref, raw))

    def cursor(self) -> Cursor:
        return Cursor(
            sources=[reader.position() for reader in self.readers],
            mix=rng_state(self.mix),
            pop=rng_state(self.pop),
            buffer=[v for p in sorted(self.groups) for ref, _ in self.groups[p] for v in ref],
            counter=self.counter,
            bad=dict(self.counts),
            worst=dict(self.worst),
            plans=self.plans,
        )

    def _restore_buffer(self, refs: list[Ref], read: Callable) -> list[tuple[Ref, dict]]:
        """The buffered samples' bytes, read again: the current shards first, then any older ones."""
        wanted: dict[Ref, dict | None] = dict.fromkeys(refs)
        for reader in self.readers:
            reader.open(wanted)
        last: dict[tuple[int, int], int] = {}  # per older shard: the last offset still buffered
        for (source, i, offset), raw in wanted.items():
            if raw is None:
                last[(source, i)] = max(offset, last.get((source, i), 0))
        for (source, i), end in sorted(last.items()):
            samples = read(self.readers[source].order[i], lambda error: True)
            for offset, raw in zip(range(end + 1), samples):  # no further than needed
                if (source, i, offset) in wanted:
                    wanted[(source, i, offset)] = raw
        missing = [ref for ref, raw in wanted.items() if raw is None]
        if missing:
            source, i, offset = missing[0]
            url = self.readers[source].order[i]
            raise DataError(
                f"data: cannot resume: sample {offset} of {url} is gone (were the shards changed?)"
            )
        return [(ref, wanted[ref]) for ref in refs]

    def _pass(self, ref: Ref) -> int:
        """One source read in order: the pass a sample belongs to. The buffer empties a pass before it
        gives out the next one's samples, so a slot yields every sample once per pass. Several sources
        or resampled shards have no passes to keep apart (0)."""
        if len(self.readers) > 1 or self.settings.resampled:
            return 0
        return self.readers[0].order.pass_of(ref[1])

    def _next_raw(self) -> tuple[Ref, dict]:
        size, weights = max(1, self.settings.shuffle_buffer), self.settings.weights
        while sum(len(group) for group in self.groups.values()) < size:
            source = self.mix.choices(range(len(weights)), weights)[0] if len(weights) > 1 else 0
            ref, raw = self.readers[source].next()
            self.groups.setdefault(self._pass(ref), []).append((ref, raw))
        oldest = min(self.groups)
        group = self.groups[oldest]
        index = self.pop.randrange(len(group))
        group[index], group[-1] = group[-1], group[index]
        sample = group.pop()
        if not group:
            del self.groups[oldest]
        return sample

    def samples(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        """Endless; a bad sample is counted under its reason and skipped."""
        while True:
            (source, i, _), raw = self._next_raw()
            self.counter += 1
            self.counts["samples_read"] += 1  # here, not into the buffer: bad ones are found here too
            seed = sample_seed(self.settings.seed, self.slot, self.counter)
            key = str(raw.get("__key__"))
            try:
                captions = decode_captions(raw)
            except Exception as error:
                self._bad("caption", key, source, i, error)
                continue
            try:
                torch.default_generator.manual_seed(seed)  # augmentation: the same after a resume
                image = transformed_image(self.settings.transform, raw)
            except Exception as error:
                self._bad("image", key, source, i, error)
                continue
            yield key, image, captions[seed % len(captions)]

    def _bad(self, reason: str, key: str, source: int, i: int, error: Exception) -> None:
        self.counts[reason] += 1
        url = self.readers[source].order[i]
        self.worst = worst_shards([self.worst, {url: 1}])
        self.warn("skipping sample %s in %s (bad %s): %s", key, url, reason, error)
