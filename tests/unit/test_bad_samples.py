"""Bad samples and shards are skipped, counted by reason in the cursor, and never silent."""

import itertools
import re

import torch

from tests.helpers.shards import corrupt_matrix, png_bytes, write_tar
from vlmtrain.data.accounting import Warner, bad_data_error, too_many_bad, worst_shards
from vlmtrain.data.stream import ShardStream
from vlmtrain.data.transforms import image_transform

TRANSFORM = image_transform(8, (0.5,) * 3, (0.5,) * 3, normalize=False)


def no_tokens(texts: list[str]) -> torch.Tensor:
    return torch.zeros(len(texts), 1, dtype=torch.long)


def test_every_kind_of_fault_is_counted_once_under_its_reason(tmp_path, caplog):
    good, expected = corrupt_matrix(tmp_path, seed=1)
    shards = sorted(str(p) for p in tmp_path.glob("*.tar"))
    sizes = {s: n for s, n in zip(shards, [14, 15, 12, 0, 12, 12])}
    stream = ShardStream([shards], TRANSFORM, no_tokens, 1, shuffle_buffer=0, seed=1, sizes=sizes)
    batches = list(itertools.islice(stream.slot_batches(0, 1), good))  # one pass
    keys = [k for batch in batches for k in batch["meta"].keys]
    assert len(set(keys)) == good and not {"undecodable", "noimage", "empty", "nocaption", "latin1"} & set(
        keys
    )
    assert batches[-1]["meta"].cursor.bad == expected | {"samples_read": good + 5}
    for needle in (
        "undecodable",
        "latin1",
        "nocaption",
        "d.tar",
        "c.tar",
    ):
        assert needle in caplog.text


def test_a_shard_cut_mid_file_is_reported_and_counted(tmp_path, caplog):
    samples = [{"__key__": f"k{i:03d}", "png": png_bytes(), "txt": f"c{i}"} for i in range(100)]
    shard = write_tar(tmp_path / "0.tar", samples)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 7 // 10])  # cut at 70%
    stream = ShardStream([[str(shard)]], TRANSFORM, no_tokens, 1, shuffle_buffer=1, sizes={str(shard): 100})
    batches = stream.slot_batches(0, 1)
    first_pass = list(itertools.takewhile(lambda b: b["meta"].cursor.sources[0][0] == 0, batches))
    assert 60 <= len(first_pass) < 100
    assert re.search(r"0.tar: (\d+) samples read, sizes.json lists 100|skipping shard .*0.tar", caplog.text)
    assert next(batches)["meta"].cursor.bad["truncated"] == 1  # once, however many errors it raised


def test_warnings_are_bounded_per_worker(caplog):
    warn = Warner(limit=3)
    for n in range(50):
        warn("bad sample %d", n)
    assert len(caplog.records) == 4 and "counted only" in caplog.records[-1].message


def test_too_many_bad_samples_is_one_line_naming_the_key():
    counts = {"image": 250, "caption": 50, "truncated": 1, "unreadable": 0, "samples_read": 1000}
    assert not too_many_bad(counts | {"samples_read": 999, "image": 900}, 0.05)  # too few read to judge
    assert too_many_bad(counts | {"samples_read": 999, "image": 900}, 0.05, final=True)
    assert too_many_bad(counts, 0.05) and not too_many_bad(counts, 0.5)
    worst = worst_shards([{"a.tar": 5, "b.tar": 1}, {"b.tar": 7, "c.tar": 2}, {"d.tar": 1}], keep=3)
    assert worst == {"b.tar": 8, "a.tar": 5, "c.tar": 2}
    message = str(bad_data_error(counts, 0.05, worst))
    assert message.startswith("data.max_bad_fraction: 30.0% of 1000 samples read were bad (250 image, ")
    assert "worst shards: b.tar (8), a.tar (5), c.tar (2);" in message
    assert "\n" not in message
