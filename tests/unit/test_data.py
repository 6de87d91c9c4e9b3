import itertools
import json
import re
import zlib
from pathlib import Path

import pytest
import torch

from tests.helpers.shards import png_bytes, write_tar
from vlmtrain.data.loader import TrainLoader
from vlmtrain.data.shards import expand_shards, read_shard, shard_sizes
from vlmtrain.data.transforms import decode_captions, image_transform
from vlmtrain.data.webdataset import ShardStream
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


def keys_of(stream: ShardStream) -> list[int]:
    return [int(v) for _, tokens in stream for v in tokens[:, 1]]


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


def test_stream_batches_every_sample_once_per_epoch(tmp_path):
    shards = caption_shards(tmp_path, 4, 8)
    transform = image_transform(8, (0.5,) * 3, (0.5,) * 3)
    stream = ShardStream(shards, transform, tokenize, batch_size=4, shuffle_buffer=5)
    batches = list(stream)
    assert len(batches) == 8
    images, tokens = batches[0]
    assert images.shape == (4, 3, 8, 8) and tokens.shape == (4, 2)
    expected = sorted(caption_key(f"caption {s} {i}") for s in range(4) for i in range(8))
    assert sorted(keys_of(stream)) == expected


def test_stream_is_deterministic_per_epoch_and_differs_across_epochs(tmp_path):
    shards = caption_shards(tmp_path, 4, 8)
    transform = image_transform(8, (0.5,) * 3, (0.5,) * 3)
    first, second = (ShardStream(shards, transform, tokenize, 4, 5, seed=3) for _ in range(2))
    assert keys_of(first) == keys_of(second)
    second.set_epoch(1)
    assert keys_of(first) != keys_of(second)


def test_ranks_read_disjoint_shards_that_cover_the_set(tmp_path):
    shards = caption_shards(tmp_path, 4, 4)
    transform = image_transform(8, (0.5,) * 3, (0.5,) * 3)
    per_rank = [
        keys_of(ShardStream(shards, transform, tokenize, 2, 1, rank=r, world_size=2)) for r in range(2)
    ]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(per_rank[0]) + len(per_rank[1]) == 16


def test_worker_processes_split_the_shards(tmp_path):
    caption_shards(tmp_path, 4, 4)
    config = DataConfig(train_shards=str(tmp_path), batch_size=2, num_workers=2, shuffle_buffer=1)
    loader = TrainLoader(config, image_transform(8, (0.5,) * 3, (0.5,) * 3), tokenize, seed=0)
    seen = [int(v) for _, tokens in itertools.islice(loader, 8) for v in tokens[:, 1]]  # one epoch
    assert sorted(seen) == sorted(caption_key(f"caption {s} {i}") for s in range(4) for i in range(4))


def test_too_few_shards_for_workers_is_a_config_error(tmp_path):
    caption_shards(tmp_path, 1, 4)
    config = DataConfig(train_shards=str(tmp_path), batch_size=2, num_workers=2)
    with pytest.raises(ConfigError, match="data.train_shards: 1 shards cannot feed 1 ranks x 2 workers"):
        TrainLoader(config, image_transform(8, (0.5,) * 3, (0.5,) * 3), tokenize, seed=0)


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
    stream = ShardStream(
        [str(tmp_path / "00000.tar")], image_transform(8, (0.0,) * 3, (1.0,) * 3), tokenize, 1
    )
    ((images, tokens),) = list(stream)
    assert images.shape == (1, 3, 8, 8)
    assert images[0, 1].mean() > 0.9 and images[0, 0].mean() < 0.1


def test_corrupt_samples_are_skipped(tmp_path, caplog):
    good = [{"__key__": f"k{i}", "png": png_bytes(), "txt": f"c{i}"} for i in range(4)]
    bad = [
        {"__key__": "broken", "png": b"not an image", "txt": "x"},
        {"__key__": "nocaption", "png": png_bytes()},
    ]
    shard = write_tar(tmp_path / "0.tar", good[:2] + bad + good[2:])
    stream = ShardStream([str(shard)], image_transform(8, (0.5,) * 3, (0.5,) * 3), tokenize, 1, 1)
    assert len(list(stream)) == 4
    assert "broken" in caplog.text and "nocaption" in caplog.text


def test_a_shard_cut_short_is_reported_against_sizes_json(tmp_path, caplog):
    samples = [{"__key__": f"k{i:03d}", "png": png_bytes(), "txt": f"c{i}"} for i in range(100)]
    shard = write_tar(tmp_path / "0.tar", samples)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 7 // 10])  # cut at 70%
    transform = image_transform(8, (0.5,) * 3, (0.5,) * 3)
    stream = ShardStream([str(shard)], transform, tokenize, 1, 1, sizes={str(shard): 100})
    read = len(list(stream))
    assert 60 <= read < 100
    found = re.search(
        r"0.tar: (\d+) samples read, sizes.json lists 100 \(truncated or unreadable shard\)", caplog.text
    )
    assert found and read <= int(found.group(1)) < 100  # the count is of samples read, before decoding


def test_multi_caption_text_is_split_per_line():
    assert decode_captions({"txt": b"one\n two \n\nthree\n"}) == ["one", "two", "three"]


def test_shard_sizes_from_sizes_json(synthetic_root):
    shards = expand_shards(str(synthetic_root / "train"))
    sizes = shard_sizes(shards)
    assert sizes is not None and sum(sizes.values()) == 3000


def test_synthetic_dataset_is_deterministic(tmp_path):
    from vlmtrain.data.synthetic import write_synthetic

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
