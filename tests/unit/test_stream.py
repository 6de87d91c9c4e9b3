"""The training stream at scale: weighted sources, resampled shards, epochs that lose nothing, and a
loader restored anywhere that yields exactly the batches of the uninterrupted one."""

import itertools
import random
from collections import Counter

import pytest
import torch

from tests.helpers.shards import keyed_shards
from vlmtrain.data.cursor import Cursor
from vlmtrain.data.loader import TrainLoader
from vlmtrain.data.stream import ShardStream
from vlmtrain.data.transforms import image_transform
from vlmtrain.schema import DataConfig, SourceConfig

TRANSFORM = image_transform(8, (0.5,) * 3, (0.5,) * 3, normalize=False)


def no_tokens(texts: list[str]) -> torch.Tensor:
    return torch.zeros(len(texts), 1, dtype=torch.long)


@pytest.mark.slow
def test_two_sources_weighted_3_to_1_are_read_75_25(tmp_path):
    a = keyed_shards(tmp_path / "a", [500] * 4, prefix="a", size=4)
    b = keyed_shards(tmp_path / "b", [500] * 4, prefix="b", size=4)
    stream = ShardStream([a, b], TRANSFORM, no_tokens, 1000, shuffle_buffer=100, weights=[3, 1])
    keys = [k for batch in itertools.islice(stream.slot_batches(0, 1), 20) for k in batch["meta"].keys]
    share = sum(k.startswith("a") for k in keys) / len(keys)
    assert len(keys) == 20_000 and 0.73 <= share <= 0.77, share


def test_resampled_shards_are_drawn_with_replacement_and_resume_exactly(tmp_path):
    shards = keyed_shards(tmp_path, [6, 6, 6])
    stream = ShardStream(
        [shards], TRANSFORM, no_tokens, 4, shuffle_buffer=5, seed=2, world_size=4, resampled=True
    )
    reference = list(itertools.islice(stream.slot_batches(3, 4), 12))  # slot 3 of 4, from 3 shards
    keys = [k for batch in reference for k in batch["meta"].keys]
    assert len({k.split("_")[0] for k in keys}) > 1 and max(Counter(keys).values()) > 1
    resumed = stream.slot_batches(3, 4, reference[4]["meta"].cursor)
    assert [next(resumed)["meta"].keys for _ in range(7)] == [b["meta"].keys for b in reference[5:]]


def test_sources_config_feeds_the_loader(tmp_path):
    keyed_shards(tmp_path / "a", [10, 10], prefix="a")
    keyed_shards(tmp_path / "b", [10], prefix="b")
    sources = [SourceConfig(str(tmp_path / "a"), 1.0), SourceConfig(str(tmp_path / "b"), 1.0)]
    config = DataConfig(sources=sources, batch_size=5, num_workers=0, shuffle_buffer=2)
    loader = TrainLoader(config, TRANSFORM, no_tokens, seed=0)
    assert loader.steps_per_epoch == 6  # 30 samples listed in the sources' sizes.json
    keys = [k for batch in itertools.islice(loader, 6) for k in batch.keys]
    assert {k[0] for k in keys} == {"a", "b"}


@pytest.mark.slow
def test_nothing_is_dropped_and_the_reported_epoch_is_the_steps_that_run(tmp_path):
    """3,000 samples in 6 shards, 2 workers, batch 256: 11 steps per epoch, all of them run, and over
    three epochs every sample is trained on, each as often as any other give or take one."""
    keyed_shards(tmp_path, [500] * 6, size=4)
    config = DataConfig(train_shards=str(tmp_path), batch_size=256, num_workers=2, shuffle_buffer=100)
    loader = TrainLoader(config, TRANSFORM, no_tokens, seed=0)
    assert loader.steps_per_epoch == 3000 // 256 == 11
    seen: Counter = Counter()
    epochs = []
    for batch in itertools.islice(loader, 33):
        seen.update(batch.keys)
        epochs.append(loader.epoch)
    assert epochs == [0] * 10 + [1] * 11 + [2] * 11 + [3]
    assert len(seen) == 3000 and max(seen.values()) - min(seen.values()) <= 1
    assert sum(seen.values()) == 33 * 256


@pytest.mark.slow
def test_a_loader_restored_anywhere_yields_the_uninterrupted_batches(tmp_path):
    keyed_shards(tmp_path, [37, 23, 41, 29])
    config = DataConfig(train_shards=str(tmp_path), batch_size=8, num_workers=2, shuffle_buffer=13)
    transform = image_transform(8, (0.5,) * 3, (0.5,) * 3, (0.4, 1.0), normalize=False)  # random crops

    def loader() -> TrainLoader:
        return TrainLoader(config, transform, no_tokens, seed=7)

    reference = [(b.keys, b.images) for b in itertools.islice(loader(), 40)]  # over two passes
    for position in sorted(random.Random(0).sample(range(1, 36), 3)):
        first = loader()
        list(itertools.islice(first, position))
        resumed = loader()
        resumed.load_state_dict(first.state_dict())
        for (keys, images), batch in zip(reference[position:], itertools.islice(resumed, 40 - position)):
            assert batch.keys == keys and torch.equal(batch.images, images), position


@pytest.mark.parametrize(
    "overrides,error",
    [
        (["data.sources=[{shards: /a, weight: 3}, {shards: /b}]"], None),
        (["data.train_shards=/t", "data.sources=[{shards: /a}]"], "data.sources: set either"),
        ([], "data.train_shards: not set"),
        (["data.sources=[{shards: /a, weight: 0}]"], "data.sources: a source's weight must be > 0"),
    ],
)
def test_exactly_one_of_train_shards_and_sources_is_set(overrides, error):
    from tests.helpers.runs import compose_train
    from vlmtrain.config_tree import typed_config
    from vlmtrain.schema import ConfigError

    unset = [
        "data.synthetic=null",
        "data.train_shards=null",
        "data.val_shards=null",
        "data.zeroshot_dir=null",
    ]
    cfg = compose_train([*unset, "trainer.wandb=false", *overrides])
    if error is None:
        assert [(s.shards, s.weight) for s in typed_config(cfg).data.sources] == [("/a", 3.0), ("/b", 1.0)]
        return
    with pytest.raises(ConfigError, match=f"^{error}"):
        typed_config(cfg)


def test_a_cursor_with_the_buffer_as_triples_resumes_alike(tmp_path):
    """Checkpoints written before the buffer became one flat list (and before the worst shards were kept)
    still resume exactly, as does the dict a checkpoint holds now."""
    shards = keyed_shards(tmp_path, [9, 7, 8])
    stream = ShardStream([shards], TRANSFORM, no_tokens, 3, shuffle_buffer=6, seed=1)
    reference = list(itertools.islice(stream.slot_batches(0, 1), 6))
    cursor = reference[2]["meta"].cursor
    saved = cursor.to_dict()
    flat = saved["buffer"]
    assert len(flat) % 3 == 0 and flat and all(isinstance(v, int) for v in flat)
    older = {k: v for k, v in saved.items() if k != "worst"} | {
        "buffer": [flat[n : n + 3] for n in range(0, len(flat), 3)]
    }
    assert Cursor.from_dict(older) == Cursor.from_dict(saved) == cursor
    for start in (cursor, Cursor.from_dict(saved), Cursor.from_dict(older)):
        resumed = stream.slot_batches(0, 1, start)
        assert [next(resumed)["meta"].keys for _ in range(3)] == [b["meta"].keys for b in reference[3:]]
