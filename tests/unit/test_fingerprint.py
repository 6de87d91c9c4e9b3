"""The shard fingerprint a checkpoint keeps: what it notices, and what it does not read."""

from __future__ import annotations

from vlmtrain.data.fingerprint import HEAD_BYTES, fingerprint, shard_changes

KEYS = ["data.train_shards"]


def _shards(tmp_path, *contents: bytes) -> list[str]:
    paths = []
    for n, data in enumerate(contents):
        path = tmp_path / f"{n:06d}.tar"
        path.write_bytes(data)
        paths.append(str(path))
    return paths


def test_the_same_shards_have_the_same_fingerprint(tmp_path):
    shards = _shards(tmp_path, b"a" * 5000, b"b" * 5000)
    assert shard_changes(fingerprint([shards]), fingerprint([shards]), KEYS) == []


def test_other_content_of_the_same_size_is_noticed(tmp_path):
    shards = _shards(tmp_path, b"a" * 5000, b"b" * 5000)
    before = fingerprint([shards])
    (tmp_path / "000001.tar").write_bytes(b"c" * 5000)
    assert shard_changes(before, fingerprint([shards]), KEYS) == [
        f"data.train_shards: {shards[1]} changed (its first {HEAD_BYTES} bytes differ)"
    ]


def test_another_size_is_noticed(tmp_path):
    shards = _shards(tmp_path, b"a" * 5000)
    before = fingerprint([shards])
    (tmp_path / "000000.tar").write_bytes(b"a" * 6000)
    assert shard_changes(before, fingerprint([shards]), KEYS) == [
        f"data.train_shards: {shards[0]} changed (size 5000 -> 6000 bytes)"
    ]


def test_list_changes_name_the_shard(tmp_path):
    a, b, c = _shards(tmp_path, b"a", b"b", b"c")
    before = fingerprint([[a, b, c]])
    assert shard_changes(before, fingerprint([[a, c]]), KEYS) == [
        f"data.train_shards: {b} is gone (3 shards then, 2 now)"
    ]
    assert shard_changes(before, fingerprint([[c, b, a]]), KEYS) == [
        f"data.train_shards: the shards are in another order from {c} on"
    ]
    assert shard_changes(before, fingerprint([[a, b], [c]]), KEYS + ["x"]) == [
        "data.sources: 1 sources then, 2 now"
    ]


def test_remote_shards_are_compared_by_their_list_only(tmp_path):
    """A pipe: command or URL is never run or fetched to fingerprint it."""
    marker = tmp_path / "ran"
    remote = [f"pipe:touch {marker}; cat x.tar", "https://example.invalid/a.tar"]
    print_ = fingerprint([remote])
    assert print_ == [{"shards": remote, "sizes": [-1, -1], "heads": ["", ""]}] and not marker.exists()
    assert shard_changes(print_, fingerprint([remote[:1]]), KEYS) == [
        f"data.train_shards: {remote[1]} is gone (2 shards then, 1 now)"
    ]
