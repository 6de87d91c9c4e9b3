import itertools
import json
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.shards import keyed_shards, png_bytes, write_tar
from vlmtrain.data.loader import DataWorkerKilled, TrainLoader
from vlmtrain.data.shards import expand_shards, read_shard, shard_sizes
from vlmtrain.data.stream import ShardStream
from vlmtrain.data.transforms import decode_captions, image_transform
from vlmtrain.schema import ConfigError, DataConfig


def caption_key(text: str) -> int:
    """A stable per-caption number (Python's str hash changes between processes)."""
    return zlib.crc32(text.encode())


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(t), caption_key(t)] for t in texts])


def caption_shards(root: Path, shards: int, per_shard: int, ext: str = "png") -> list[str]:
    paths = []
    for s in range(shards):
        samples = [
            {
                "__key__": f"s{s}_{i:04d}",
                ext: png_bytes((s * 40 % 255, i % 255, 7)),
                "txt": f"caption {s} {i}",
            }
            for i in range(per_shard)
        ]
        paths.append(str(write_tar(root / f"train-{s:06d}.tar", samples)))
    return paths


def batches(stream: ShardStream, count: int, slot: int = 0, slots: int = 1) -> list[dict]:
    return list(itertools.islice(stream.slot_batches(slot, slots), count))


def keys_of(batches: list[dict]) -> list[int]:
    return [int(v) for batch in batches for v in batch["tokens"][:, 1]]


def test_expand_brace_pattern_directory_and_list(tmp_path):
    paths = caption_shards(tmp_path, 3, 2)
    assert expand_shards(str(tmp_path / "train-{000000..000002}.tar")) == paths
    assert expand_shards(str(tmp_path)) == paths
    assert expand_shards(f"{paths[0]}::{paths[2]}") == [paths[0], paths[2]]


def test_missing_shard_names_key_and_path(tmp_path):
    caption_shards(tmp_path, 1, 2)
    with pytest.raises(FileNotFoundError, match=r"data.train_shards: no such shard .*train-000001.tar"):
        expand_shards(str(tmp_path / "train-{000000..000001}.tar"), "data.train_shards")
    with pytest.raises(FileNotFoundError, match="data.val_shards"):
        expand_shards(str(tmp_path / "nowhere"), "data.val_shards")


def test_a_slot_yields_every_sample_once_per_pass(tmp_path):
    shards = caption_shards(tmp_path, 4, 8)
    transform = image_transform(8, (0.5,) * 3, (0.5,) * 3)
    stream = ShardStream([shards], transform, tokenize, batch_size=4, shuffle_buffer=5)
    first_two_passes = batches(stream, 16)
    images, tokens = first_two_passes[0]["images"], first_two_passes[0]["tokens"]
    assert images.shape == (4, 3, 8, 8) and tokens.shape == (4, 2)
    expected = sorted(caption_key(f"caption {s} {i}") for s in range(4) for i in range(8))
    first, second = keys_of(first_two_passes[:8]), keys_of(first_two_passes[8:])
    assert sorted(first) == expected and sorted(second) == expected and first != second


def test_stream_is_a_function_of_the_seed(tmp_path):
    shards = caption_shards(tmp_path, 4, 8)
    transform = image_transform(8, (0.5,) * 3, (0.5,) * 3)
    a, b, c = (
        ShardStream([shards], transform, tokenize, 4, shuffle_buffer=5, seed=seed) for seed in (3, 3, 4)
    )
    assert keys_of(batches(a, 8)) == keys_of(batches(b, 8)) != keys_of(batches(c, 8))


def test_slots_read_disjoint_shards_that_cover_the_set(tmp_path):
    shards = caption_shards(tmp_path, 4, 4)
    transform = image_transform(8, (0.5,) * 3, (0.5,) * 3)
    stream = ShardStream([shards], transform, tokenize, 2, shuffle_buffer=1, world_size=2)
    per_slot = [keys_of(batches(stream, 4, slot, 2)) for slot in range(2)]  # one pass each
    assert not set(per_slot[0]) & set(per_slot[1])
    assert len(set(per_slot[0]) | set(per_slot[1])) == 16


def test_a_slot_resumed_from_any_cursor_yields_the_same_batches_and_augmentation(tmp_path):
    shards = caption_shards(tmp_path, 3, 10)
    transform = image_transform(8, (0.5,) * 3, (0.5,) * 3, random_crop_scale=(0.3, 1.0), normalize=False)
    stream = ShardStream([shards], transform, tokenize, batch_size=3, shuffle_buffer=7, seed=1)
    reference = batches(stream, 25)  # two and a half passes
    for position in (1, 6, 10, 17):
        resumed = stream.slot_batches(0, 1, reference[position - 1]["meta"].cursor)
        for expected in reference[position:]:
            got = next(resumed)
            assert got["meta"].keys == expected["meta"].keys
            assert torch.equal(got["images"], expected["images"])
            assert torch.equal(got["tokens"], expected["tokens"])


def test_the_stream_leaves_the_trainers_torch_rng_alone(tmp_path):
    shards = caption_shards(tmp_path, 1, 4)
    stream = ShardStream(
        [shards], image_transform(8, (0.5,) * 3, (0.5,) * 3, (0.5, 1.0)), tokenize, 2, shuffle_buffer=1
    )
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    batches(stream, 2)
    assert torch.equal(torch.rand(3), expected)


def test_loader_state_is_plain_values_that_load_weights_only(tmp_path):
    caption_shards(tmp_path, 2, 6)
    config = DataConfig(
        train_shards=str(tmp_path), batch_size=2, num_workers=0, shuffle_buffer=3, samples_per_epoch=12
    )
    loader = TrainLoader(config, image_transform(8, (0.5,) * 3, (0.5,) * 3), tokenize, seed=0)
    list(itertools.islice(loader, 3))
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["batches"] == 3 and state["bad"]["samples_read"] >= 6 and set(state["cursors"]) == {0}


def test_too_few_shards_for_workers_is_a_config_error(tmp_path):
    caption_shards(tmp_path, 1, 4)
    config = DataConfig(train_shards=str(tmp_path), batch_size=2, num_workers=2, samples_per_epoch=4)
    with pytest.raises(ConfigError, match="data.train_shards: 1 shards cannot feed 1 ranks x 2 workers"):
        TrainLoader(config, image_transform(8, (0.5,) * 3, (0.5,) * 3), tokenize, seed=0)


def test_epoch_length_needs_sizes_or_samples_per_epoch(tmp_path):
    caption_shards(tmp_path, 2, 4)  # no sizes.json
    transform = image_transform(8, (0.5,) * 3, (0.5,) * 3)
    config = DataConfig(train_shards=str(tmp_path), batch_size=2, num_workers=0)
    with pytest.raises(
        ConfigError, match=r"^data.samples_per_epoch: required \(no sizes.json or img2dataset"
    ):
        TrainLoader(config, transform, tokenize, seed=0)
    config.samples_per_epoch = 10
    assert TrainLoader(config, transform, tokenize, seed=0, world_size=2).steps_per_epoch == 2
    config.samples_per_epoch = 3
    with pytest.raises(ConfigError, match="^data.batch_size: 2 x 2 rank"):
        TrainLoader(config, transform, tokenize, seed=0, world_size=2)


def test_a_resume_on_more_ranks_shares_out_the_rest_of_the_epoch(tmp_path):
    """1 rank for 3 steps, then 2 ranks (each loading the same saved position) to the end of the epoch:
    the epoch's batches hold every sample once. Shards listed in sizes.json: 4 of 6 samples, a global
    batch of 4, so each slot's share is whole batches."""
    keyed_shards(tmp_path, [6] * 4)
    transform = image_transform(8, (0.5,) * 3, (0.5,) * 3)
    config = DataConfig(train_shards=str(tmp_path), batch_size=4, num_workers=0, shuffle_buffer=5)
    one = TrainLoader(config, transform, tokenize, seed=0)
    keys = [key for _, batch in zip(range(3), one) for key in batch.keys]
    state, config.batch_size = one.state_dict(), 2  # the global batch kept: 2 per rank x 2 ranks
    for rank in range(2):
        loader = TrainLoader(config, transform, tokenize, seed=0, rank=rank, world_size=2)
        loader.load_state_dict(state)
        assert loader.steps_per_epoch == 6 and sorted(loader.cursors) == [rank]
        keys += [key for _, batch in zip(range(3), loader) for key in batch.keys]
    assert sorted(keys) == sorted(f"s{s}_{i:05d}" for s in range(4) for i in range(6))


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
def test_reads_img2dataset_layout(tmp_path, ext):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), (0, 255, 0)).save(buffer, format={"jpg": "JPEG"}.get(ext, ext.upper()))
    sample = {
        "__key__": "000000001",
        ext: buffer.getvalue(),
        "txt": "a green thing",
        "json": json.dumps({"w": 12}),
    }
    write_tar(tmp_path / "00000.tar", [sample])
    transform = image_transform(8, (0.0,) * 3, (1.0,) * 3)
    stream = ShardStream([[str(tmp_path / "00000.tar")]], transform, tokenize, 1)
    (batch,) = batches(stream, 1)
    images = batch["images"]
    assert images.shape == (1, 3, 8, 8) and batch["meta"].keys == ["000000001"]
    assert images[0, 1].mean() > 0.9 and images[0, 0].mean() < 0.1


def test_multi_caption_text_is_split_per_line():
    assert decode_captions({"txt": b"one\n two \n\nthree\n"}) == ["one", "two", "three"]


def test_shard_sizes_from_sizes_json(synthetic_root):
    shards = expand_shards(str(synthetic_root / "train"))
    sizes = shard_sizes(shards)
    assert sizes is not None and sum(sizes.values()) == 3000


def test_synthetic_dataset_is_deterministic(tmp_path):
    from vlmtrain.datasets.synthetic import write_synthetic

    a = write_synthetic(tmp_path / "a", 50, 10, seed=5)
    b = write_synthetic(tmp_path / "b", 50, 10, seed=5)
    for rel in ("train/000000.tar", "val/000000.tar", "classification/test/0.tar"):
        contents = [
            [{k: v for k, v in x.items() if k != "__url__"} for x in read_shard(str(root / rel), print)]
            for root in (a, b)
        ]
        assert contents[0] == contents[1] and contents[0]
    names = (a / "classification" / "classnames.txt").read_text().split("\n")
    assert (
        "red circle" in names
        and "{c}" in (a / "classification" / "zeroshot_classification_templates.txt").read_text()
    )


def test_uint8_transform_then_batch_normalize_equals_the_float_transform_bit_for_bit():
    from PIL import Image

    from vlmtrain.data.transforms import BatchNormalize

    image = Image.fromarray(torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8).numpy())
    mean, std = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)
    torch.manual_seed(0)
    as_float = image_transform(32, mean, std, random_crop_scale=(0.5, 1.0))(image)
    torch.manual_seed(0)
    as_uint8 = image_transform(32, mean, std, random_crop_scale=(0.5, 1.0), normalize=False)(image)
    assert as_uint8.dtype == torch.uint8
    assert torch.equal(BatchNormalize(mean, std)(as_uint8[None])[0], as_float)
    channels_last = as_uint8[None].contiguous(memory_format=torch.channels_last)  # as reused buffers hold it
    normalized = BatchNormalize(mean, std)(channels_last)
    assert normalized.is_contiguous() and torch.equal(normalized[0], as_float)
    again = BatchNormalize(mean, std)
    first = again(as_uint8[None]).clone()
    reused = again(channels_last)  # the same shape: the same buffer, filled anew
    assert reused.data_ptr() == again(as_uint8[None]).data_ptr() and torch.equal(first, reused)


class _DiesMidHandOver:
    """A DataLoader iterator whose worker was killed while handing a batch's shared tensors over."""

    def __init__(self, error: BaseException) -> None:
        self.error, self._workers = error, [SimpleNamespace(pid=4242, exitcode=-9)]

    def __next__(self) -> dict:
        raise self.error


@pytest.mark.parametrize("error", [ConnectionResetError(104, "Connection reset by peer"), EOFError()])
def test_a_worker_killed_while_handing_a_batch_over_is_one_line(error):
    loader = object.__new__(TrainLoader)  # only its iterator matters here
    loader._running = _DiesMidHandOver(error)
    with pytest.raises(DataWorkerKilled, match=r"^data worker pid 4242 was killed \(signal 9"):
        loader._next_batch()
