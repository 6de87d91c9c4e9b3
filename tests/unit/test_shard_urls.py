"""Shards from pipe: commands, HTTP and fsspec URLs: the same samples as from local files, retries that
never repeat a sample, and one report for a shard that cannot be read."""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import tarfile
import time
from pathlib import Path

import fsspec
import pytest

from tests.helpers.http import serve
from tests.helpers.shards import write_tar
from vlmtrain.data.loader import prepare_data
from vlmtrain.data.shards import ShardUnreadable, expand_shards, read_shard, shard_sizes
from vlmtrain.schema import ConfigError, DataConfig

SHARDS, PER_SHARD = 4, 12
FAST = {"backoff_s": 0.001}


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """Shards of random bytes (several KB a sample, so a half-sent shard holds whole samples)."""
    rng = random.Random(0)
    for shard in range(SHARDS):
        samples = [
            {"__key__": f"{shard:02d}-{i:03d}", "jpg": rng.randbytes(3000), "txt": f"caption {i}".encode()}
            for i in range(PER_SHARD)
        ]
        write_tar(tmp_path / "shards" / f"{shard:05d}.tar", samples)
    return tmp_path / "shards"


def _read(urls: list[str], errors: list | None = None, **options: float) -> list[dict]:
    sink = [] if errors is None else errors
    return [
        {k: v for k, v in sample.items() if k != "__url__"}
        for url in urls
        for sample in read_shard(url, on_error=sink.append, **{**FAST, **options})
    ]


def _local(shard_dir: Path) -> list[dict]:
    samples = _read(expand_shards(str(shard_dir)))
    assert len(samples) == SHARDS * PER_SHARD
    return samples


def test_pipe_and_http_read_the_same_samples_as_local_paths(shard_dir):
    local = _local(shard_dir)
    piped = expand_shards(f"pipe:cat {shard_dir}/{{00000..00003}}.tar")
    assert piped[1] == f"pipe:cat {shard_dir}/00001.tar"
    errors: list = []
    assert _read(piped, errors) == local
    with serve(shard_dir) as server:
        urls = expand_shards(f"{server.url}/{{00000..00003}}.tar")
        assert _read(urls, errors) == local
        sample = next(read_shard(urls[0], on_error=errors.append))
        assert sample["__url__"] == urls[0]
    assert errors == []


def test_flaky_shards_are_retried_without_repeats_and_a_broken_one_is_skipped_once(shard_dir, caplog):
    local = _local(shard_dir)
    faults = {"00000.tar": ["error", "error"], "00001.tar": ["drop"], "00003.tar": ["error", "drop"]}
    errors: list = []
    with serve(shard_dir, faults, broken={"00002.tar"}) as server:
        urls = expand_shards(f"{server.url}/{{00000..00003}}.tar")
        read, tries_at_yield = [], []
        with caplog.at_level(logging.WARNING, logger="vlmtrain"):
            for url in urls:
                for sample in read_shard(url, on_error=errors.append, retries=3, backoff_s=0.001):
                    read.append({k: v for k, v in sample.items() if k != "__url__"})
                    tries_at_yield.append((url, server.requests[url.rsplit("/", 1)[1]]))
                    if url == urls[1]:  # read from the first half: its connection may now drop
                        server.release.set()
        assert dict(server.requests) == {"00000.tar": 3, "00001.tar": 2, "00002.tar": 4, "00003.tar": 3}
    expected = [s for s in local if not s["__key__"].startswith("02-")]
    assert read == expected  # every good sample exactly once, in order
    dropped = [n for url, n in tries_at_yield if url == urls[1]]
    assert 0 < dropped.count(1) < PER_SHARD  # part of shard 1 came before its connection dropped
    assert len(errors) == 1 and isinstance(errors[0], ShardUnreadable)
    assert errors[0].url == urls[2] and str(errors[0]).startswith(urls[2])
    assert "after 4 attempts" in str(errors[0]) and "\n" not in str(errors[0])
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping shard")]
    assert len(skipped) == 1 and urls[2] in skipped[0]


def test_without_retries_a_flaky_shard_is_skipped(shard_dir):
    local = _local(shard_dir)
    errors: list = []
    with serve(shard_dir, {"00000.tar": ["error"], "00001.tar": ["drop"]}) as server:
        server.release.set()
        urls = expand_shards(f"{server.url}/{{00000..00003}}.tar")
        read = _read(urls, errors, retries=0)
    assert [e.url for e in errors] == urls[:2]
    # shard 1 keeps the samples read before its connection dropped; none is repeated
    keys = [s["__key__"] for s in read]
    assert len(keys) == len(set(keys)) and read[-2 * PER_SHARD :] == local[-2 * PER_SHARD :]
    assert not any(k.startswith("00-") for k in keys)


def test_fsspec_urls_read_like_local_paths(shard_dir):
    local = _local(shard_dir)
    memory = fsspec.filesystem("memory")
    try:
        for path in sorted(shard_dir.glob("*.tar")):
            memory.pipe(f"/test-shard-urls/{path.name}", path.read_bytes())
        assert _read(expand_shards("memory://test-shard-urls/{00000..00003}.tar")) == local
        errors: list = []
        assert _read(["memory://test-shard-urls/missing.tar"], errors, retries=1) == []
        assert len(errors) == 1 and "missing.tar" in str(errors[0])
    finally:
        memory.rm("/test-shard-urls", recursive=True)
    assert _read(expand_shards(f"file://{shard_dir}/{{00000..00003}}.tar")) == local


def test_remote_patterns_are_not_opened_and_unreadable_schemes_fail_in_one_line(shard_dir):
    assert len(expand_shards("http://127.0.0.1:9/nowhere-{0..9}.tar")) == 10  # nothing listens
    assert len(expand_shards("pipe:false {0..2}::memory://nowhere/{a,b}.tar")) == 5
    assert expand_shards("http://[::1]:8/a.tar::https://[::1]/b.tar") == [
        "http://[::1]:8/a.tar",
        "https://[::1]/b.tar",
    ]
    with pytest.raises(ConfigError, match=r"^data.train_shards: unknown URL scheme nosuch://") as error:
        expand_shards("nosuch://bucket/{0..3}.tar")
    assert "\n" not in str(error.value)
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"^data.val_shards: s3:// URLs need .*s3fs.*pip install s3fs"):
            expand_shards("s3://bucket/shard-{000..009}.tar", "data.val_shards")
    with pytest.raises(FileNotFoundError, match=r"^data.train_shards: no such shard .*00004.tar$"):
        expand_shards(f"pipe:cat x.tar::{shard_dir}/{{00000..00009}}.tar")


@pytest.mark.parametrize("command", ["false", "cat /nonexistent/shard.tar", "exit 3"])
def test_a_failing_pipe_command_is_skipped_and_reported(command):
    errors: list = []
    assert _read([f"pipe:{command}"], errors, retries=2) == []
    assert len(errors) == 1 and str(errors[0]).startswith(f"pipe:{command}: unreadable after 3 attempts")
    assert "exited with status" in str(errors[0])


@pytest.mark.parametrize("cut", ["empty", "inside a member", "between members"])
def test_a_corrupt_local_tar_is_reported_once_and_not_retried(shard_dir, cut, caplog):
    whole = (shard_dir / "00000.tar").read_bytes()
    with tarfile.open(shard_dir / "00000.tar") as tar:
        fourth = tar.getmembers()[6].offset  # the header of the 4th sample's first file
    length = {"empty": 0, "inside a member": fourth + 700, "between members": fourth}[cut]
    broken = shard_dir / "broken.tar"
    broken.write_bytes(whole[:length])
    errors: list = []
    with caplog.at_level(logging.WARNING, logger="vlmtrain"):
        samples = _read([str(broken)], errors, retries=5)
    assert len(samples) < PER_SHARD and len(errors) == 1
    assert str(errors[0]).startswith(f"{broken}: unreadable, skipped after {len(samples)} samples")
    assert sum("read failed" in r.getMessage() for r in caplog.records) == 0  # no retry


def test_a_compressed_tar_is_read_and_a_cut_one_reported_once(shard_dir):
    whole = gzip.compress((shard_dir / "00000.tar").read_bytes(), mtime=0)
    (shard_dir / "zipped.tar.gz").write_bytes(whole)
    (shard_dir / "cut.tar.gz").write_bytes(whole[: len(whole) // 2])
    errors: list = []
    assert _read([str(shard_dir / "zipped.tar.gz")], errors) == _read([str(shard_dir / "00000.tar")])
    assert errors == []
    assert len(_read([str(shard_dir / "cut.tar.gz")], errors)) < PER_SHARD and len(errors) == 1


def test_shard_sizes_from_img2dataset_stats(shard_dir, tmp_path):
    shards = expand_shards(str(shard_dir))
    assert shard_sizes(shards) is None
    for index, shard in enumerate(shards):  # img2dataset writes 00000_stats.json beside 00000.tar
        stats = {"count": 20, "successes": 10 + index, "failed_to_download": 10 - index}
        Path(shard).with_name(f"{Path(shard).stem}_stats.json").write_text(json.dumps(stats))
    assert shard_sizes(shards) == {s: 10 + i for i, s in enumerate(shards)}
    (shard_dir / "sizes.json").write_text(json.dumps({"00000.tar": 12}))  # sizes.json comes first
    assert shard_sizes(shards)[shards[0]] == 12
    assert shard_sizes([*shards, f"pipe:cat {shards[0]}"]) is None
    assert shard_sizes(["http://127.0.0.1:9/00000.tar"]) is None


@pytest.mark.parametrize(("key", "value"), [("shard_retries", -1), ("retry_backoff_s", -0.5)])
def test_retry_settings_are_checked(key, value):
    assert DataConfig(train_shards="x").shard_retries == 3
    with pytest.raises(ConfigError, match=rf"^data.{key}: must be >= 0, got {value}$"):
        DataConfig(train_shards="x", **{key: value})


def test_eval_style_callers_still_read_local_shards(shard_dir):
    shard = str(shard_dir / "00000.tar")
    assert len(list(read_shard(shard, on_error=lambda exc: False))) == PER_SHARD
    assert os.path.basename(next(read_shard(shard, lambda exc: False))["__url__"]) == "00000.tar"


def test_prepare_data_accepts_remote_specs_and_still_names_a_missing_local_shard(shard_dir):
    remote = DataConfig(
        train_shards="pipe:aws s3 cp s3://bucket/shard-{000000..000999}.tar -",
        val_shards=f"http://127.0.0.1:9/val-{{0..3}}.tar::{shard_dir}/00000.tar",
        retrieval={"coco": "file:///nowhere/coco-{0..1}.tar"},
    )
    prepare_data(remote, is_main=True)
    with pytest.raises(FileNotFoundError, match=r"^data.retrieval.flickr: no such shard .*missing.tar$"):
        prepare_data(DataConfig(train_shards=str(shard_dir), retrieval={"flickr": "x/missing.tar"}), True)
    with pytest.raises(ConfigError, match=r"^data.train_shards: unknown URL scheme"):
        prepare_data(DataConfig(train_shards="nosuch://x/{0..1}.tar"), is_main=True)


def test_a_reader_that_stops_early_stops_the_command(shard_dir):
    start = time.monotonic()
    samples = read_shard(f"pipe:cat {shard_dir}/00000.tar; exec sleep 60", on_error=pytest.fail)
    assert next(samples)["__key__"] == "00-000"
    samples.close()  # kills the command rather than waiting for it to exit
    assert time.monotonic() - start < 20


def test_a_server_that_is_not_there_is_retried_then_reported(shard_dir):
    with serve(shard_dir) as server:
        url = f"{server.url}/00000.tar"  # the port is free again once the server has stopped
    errors: list = []
    assert _read([url], errors, retries=1) == []
    assert [str(e) for e in errors] == [
        f"{url}: unreadable after 2 attempts, skipped after 0 samples: curl exit 7: could not connect"
    ]
