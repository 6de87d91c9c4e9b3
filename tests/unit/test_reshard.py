"""The data position shared out over another ranks x workers (vlmtrain.data.reshard): slots read in-memory
shards step by step as the loader hands out batches (a rank's batch n from its worker n % workers),
are stopped, re-partitioned onto a new layout, and go on; every pass trains each sample exactly once."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from vlmtrain.data import slot as slot_module
from vlmtrain.data.cursor import Cursor, Piece
from vlmtrain.data.reshard import Layout, Reading, apportion, reshard, split
from vlmtrain.data.slot import SlotReader, SlotSettings

SEED = 5


def _shards(counts: list[int], prefix: str = "") -> tuple[list[str], dict[str, int], dict[str, list[dict]]]:
    urls = [f"mem://{prefix}{n:03d}.tar" for n in range(len(counts))]
    data = {
        url: [{"__key__": f"{prefix}{n}_{i}"} for i in range(c)]
        for n, (url, c) in enumerate(zip(urls, counts))
    }
    return urls, {url: c for url, c in zip(urls, counts)}, data


@pytest.fixture
def memory(monkeypatch):
    """Shards held in memory: read_shard yields their raw samples."""
    shards: dict[str, list[dict]] = {}
    monkeypatch.setattr(slot_module, "read_shard", lambda url, on_error, **_: iter(shards[url]))
    return shards


class Run:
    """Slots of one layout stepping together: per step, each rank's slot (step % workers) takes a batch."""

    def __init__(self, urls, sizes, layout: Layout, batch: int, cursors: dict[int, Cursor], buffer: int):
        """`urls`: one source's shards, or several sources' (a list of lists, mixed 1:2:3...)."""
        self.layout, self.batch = layout, batch
        sources = urls if isinstance(urls[0], list) else [urls]
        weights = [float(n + 1) for n in range(len(sources))]
        settings = SlotSettings(sources, None, weights, shuffle_buffer=buffer, seed=SEED, sizes=sizes)
        self.readers = {
            slot: SlotReader(
                settings, slot, layout.slots, cursors.get(slot) or Cursor.start(len(sources), SEED, slot)
            )
            for slot in range(layout.slots)
        }

    def step(self, n: int) -> list[tuple[int, str]]:
        """Batch n of every rank: (pass, key) of each sample."""
        taken = []
        for rank in range(self.layout.ranks):
            reader = self.readers[rank * self.layout.workers + n % self.layout.workers]
            for _ in range(self.batch):
                (source, i, _), raw = reader._next_raw()
                reader.counter += 1
                taken.append((reader.readers[source].order.pass_of(i), raw["__key__"]))
        return taken

    def cursors(self) -> dict[int, Cursor]:
        return {slot: Cursor.from_dict(r.cursor().to_dict()) for slot, r in self.readers.items()}

    def frontier(self, source: int = 0) -> int:
        """The lowest pass of `source` any slot still has samples of: the passes before it are complete."""
        lowest = []
        for reader in self.readers.values():
            order, i = reader.readers[source].order, reader.readers[source].i
            held = [ref[1] for group in reader.groups.values() for ref, _ in group if ref[0] == source]
            lowest.append(min(order.pass_of(j) for j in [*held, i]))
        return min(lowest)


def _train(
    memory, counts, shapes, stops, *, global_batch, steps_per_epoch, buffer, sizes_known=True, epochs=2
):
    """Train `shapes` one after another, changing at the steps in `stops`, for `epochs`; (step, pass, key)
    of each sample, the shards' samples, the last layout's run."""
    urls, sizes, data = _shards(counts)
    memory.update(data)
    reading = Reading([urls], sizes if sizes_known else {}, SEED)
    run, taken, step = None, [], 0
    for shape, stop in zip(shapes, [*stops, None]):
        layout = Layout(*shape)
        cursors = (
            {}
            if run is None
            else reshard(
                run.cursors(), run.layout, layout, reading, batches=step, steps_per_epoch=steps_per_epoch
            )
        )
        run = Run(urls, reading.sizes, layout, global_batch // layout.ranks, cursors, buffer)
        while stop is None and step < epochs * steps_per_epoch or stop is not None and step < stop:
            taken += [(step, number, key) for number, key in run.step(step)]
            step += 1
    return taken, data, run


ALIGNED = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 2), (4, 1), (6, 2), (12, 1)]


@pytest.mark.parametrize("trial", range(12))
def test_each_epoch_trains_every_sample_once_across_two_changes_of_layout(memory, trial):
    """12 shards of 10, a global batch of 12: every layout here gives each slot whole batches per pass,
    so an epoch is a pass; stopped twice at random steps of the first epoch, on random layouts."""
    rng = random.Random(trial)
    shapes = rng.sample(ALIGNED, 3)
    stops = sorted(rng.sample(range(1, 10), 2))
    buffer = rng.choice([1, 7, 30])
    taken, data, _ = _train(
        memory, [10] * 12, shapes, stops, global_batch=12, steps_per_epoch=10, buffer=buffer
    )
    every = Counter(sample["__key__"] for samples in data.values() for sample in samples)
    for epoch in range(2):
        keys = Counter(key for step, _, key in taken if epoch * 10 <= step < (epoch + 1) * 10)
        assert keys == every, (shapes, stops, epoch)


def _check_passes(taken, data, run):
    """No pass trains a sample twice, and each pass the slots are all done with trains every one."""
    every = Counter(sample["__key__"] for samples in data.values() for sample in samples)
    by_pass: dict[int, Counter] = {}
    for _, number, key in taken:
        by_pass.setdefault(number, Counter())[key] += 1
    done = run.frontier()
    assert done >= 1
    for number, keys in by_pass.items():
        assert max(keys.values()) == 1, number
        assert number >= done or keys == every, number


@pytest.mark.parametrize("sizes_known", [True, False])
@pytest.mark.parametrize("trial", range(10))
def test_uneven_shards_on_any_layouts_train_each_sample_once_per_pass(memory, trial, sizes_known):
    """Shards of uneven sizes, layouts that do not divide them, three changes at random steps: epochs are
    no longer passes, but each pass still trains every sample once."""
    rng = random.Random(100 + trial)
    counts = [rng.randint(2, 15) for _ in range(rng.randint(6, 11))]
    shapes = [(r, w) for r in (1, 2, 3, 4, 6) for w in (1, 2, 3) if r * w <= len(counts)]
    spe = sum(counts) // 12
    stops = sorted(rng.sample(range(1, 2 * spe), 3))
    taken, data, run = _train(
        memory, counts, rng.sample(shapes, 4), stops, global_batch=12, steps_per_epoch=spe,
        buffer=rng.choice([1, 5, 40]), sizes_known=sizes_known, epochs=4,
    )  # fmt: skip
    _check_passes(taken, data, run)


def test_two_sources_mixed_by_weight_train_each_sample_of_each_once_per_pass(memory):
    """Two sources (weights 1:2) read at their own pace, their passes apart: each source's passes still
    train every one of its samples once across three changes of layout."""
    (a, a_sizes, a_data), (b, b_sizes, b_data) = _shards([7, 4, 9, 5, 8, 6], "a"), _shards([3, 5, 4, 6], "b")
    memory.update(a_data | b_data)
    reading, rng = Reading([a, b], a_sizes | b_sizes, SEED), random.Random(7)
    run, taken, step = None, [], 0
    for shape, stop in zip([(2, 2), (1, 3), (4, 1), (2, 1)], [5, 9, 14, 40]):
        layout = Layout(*shape)
        cursors = {}
        if run is not None:
            cursors = reshard(run.cursors(), run.layout, layout, reading, batches=step, steps_per_epoch=6)
        run = Run([a, b], reading.sizes, layout, 12 // layout.ranks, cursors, rng.choice([1, 6]))
        for n in range(step, stop):
            taken += run.step(n)
        step = stop
    for source, data in enumerate([a_data, b_data]):
        every = Counter(sample["__key__"] for samples in data.values() for sample in samples)
        prefix, done = "ab"[source], run.frontier(source)
        assert done >= 2
        for number in range(done + 1):
            keys = Counter(key for n, key in taken if n == number and key.startswith(prefix))
            assert max(keys.values(), default=1) == 1 and (number >= done or keys == every), (source, number)


def test_a_re_partitioned_position_resumes_exactly_on_the_same_layout(memory):
    """After a change of layout, a stop and resume on the same layout (cursors saved and read back) gives
    the samples the run that went on would have had."""
    urls, sizes, data = _shards([10] * 12)
    memory.update(data)
    reading, old, new = Reading([urls], sizes, SEED), Layout(2, 2), Layout(3, 1)
    first = Run(urls, sizes, old, 6, {}, 7)
    for step in range(3):
        first.step(step)
    cursors = reshard(first.cursors(), old, new, reading, batches=3, steps_per_epoch=10)
    going_on, stopped = Run(urls, sizes, new, 4, cursors, 7), Run(urls, sizes, new, 4, cursors, 7)
    for step in range(3, 6):
        assert going_on.step(step) == stopped.step(step)
    resumed = Run(urls, sizes, new, 4, stopped.cursors(), 7)
    assert [going_on.step(step) for step in range(6, 16)] == [resumed.step(step) for step in range(6, 16)]


def test_resampled_slots_draw_past_every_old_draw():
    urls, sizes, _ = _shards([5] * 4)
    old = {slot: Cursor.start(1, SEED, slot) for slot in range(2)}
    old[0].sources[0] = [7, 3, 0]
    old[1].sources[0] = [4, 1, 0]
    new = reshard(
        old, Layout(1, 2), Layout(3, 1), Reading([urls], sizes, SEED, True), batches=9, steps_per_epoch=5
    )
    assert sorted(new) == [0, 1, 2] and all(c.sources == [[8, 0, 0]] and not c.plans for c in new.values())


def test_bad_sample_counts_carry_over_once():
    urls, sizes, _ = _shards([5] * 4)
    old = {slot: Cursor.start(1, SEED, slot) for slot in range(4)}
    for slot, cursor in old.items():
        cursor.bad["image"], cursor.worst = slot, {urls[slot]: slot + 1}
    new = reshard(old, Layout(2, 2), Layout(1, 1), Reading([urls], sizes, SEED), batches=0, steps_per_epoch=5)
    assert new[0].bad["image"] == 6 and new[0].worst == {urls[n]: n + 1 for n in (3, 2, 1, 0)}
    assert all(sum(c.bad.values()) == 0 and not c.worst for slot, c in new.items() if slot)


@pytest.mark.parametrize(
    "count,weights,expected", [(10, [1, 1, 1], [4, 3, 3]), (7, [2, 0, 1], [5, 0, 2]), (0, [1, 2], [0, 0])]
)
def test_apportion_sums_to_the_count(count, weights, expected):
    assert apportion(count, weights) == expected


@pytest.mark.parametrize("count", range(1, 9))
def test_split_keeps_every_sample_once(count):
    piece = Piece(3, 1, 10, 16, (2, 5))
    head, tail = split(piece, count)
    taken = lambda p: {o for o in range(20) if p.takes(o)}  # noqa: E731
    assert len(taken(head)) == count and taken(head) | taken(tail) == taken(piece)
    assert not taken(head) & taken(tail) and head.number == tail.number == 3
