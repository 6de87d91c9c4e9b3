"""Remote reads cannot hang: a stalled server and a silent command fail after `timeout_s` without a byte,
are retried and reported; a 404 is not retried; a command dies with the process reading it."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.http import serve
from tests.helpers.shards import write_tar
from vlmtrain.data.shards import ShardUnreadable, read_shard
from vlmtrain.data.streams import CommandStream, ThreadedStream

PER_SHARD = 12
QUICK = {"retries": 1, "backoff_s": 0.01, "timeout_s": 0.5}


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    rng = random.Random(0)
    samples = [
        {"__key__": f"{i:03d}", "jpg": rng.randbytes(3000), "txt": b"a caption"} for i in range(PER_SHARD)
    ]
    write_tar(tmp_path / "shards" / "00000.tar", samples)
    return tmp_path / "shards"


def _descendants() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def test_a_stalled_server_fails_the_read_after_the_timeout_and_is_retried(shard_dir):
    errors: list = []
    with serve(shard_dir, faults={"00000.tar": ["stall", "stall"]}) as server:
        start = time.monotonic()
        keys = [s["__key__"] for s in read_shard(f"{server.url}/00000.tar", errors.append, **QUICK)]
        took = time.monotonic() - start
        assert server.requests["00000.tar"] == 2
    assert 0 < len(keys) < PER_SHARD and len(set(keys)) == len(keys)  # the first half, once
    # two reads of 0.5 s each without a byte; the upper bound only says it did not hang (a loaded machine)
    assert 1.0 <= took < 15.0, took
    assert len(errors) == 1 and isinstance(errors[0], ShardUnreadable)
    assert "after 2 attempts" in str(errors[0]) and "read timeout" in str(errors[0])


def test_a_silent_pipe_command_times_out_and_leaves_no_process(shard_dir):
    before = _descendants()
    errors: list = []
    start = time.monotonic()
    assert list(read_shard("pipe:sleep 1000", errors.append, **QUICK)) == []
    assert time.monotonic() - start < 15.0
    assert len(errors) == 1 and "read timeout" in str(errors[0]) and "after 2 attempts" in str(errors[0])
    assert _descendants() - before == set()


@pytest.mark.parametrize("missing", [True, False])
def test_a_missing_shard_is_tried_once_and_a_server_error_is_retried(shard_dir, missing):
    errors: list = []
    faults = {} if missing else {"00000.tar": ["error"] * 4}
    with serve(shard_dir, faults=faults, missing={"00000.tar"} if missing else set()) as server:
        list(read_shard(f"{server.url}/00000.tar", errors.append, retries=3, backoff_s=0.01))
        assert server.requests["00000.tar"] == (1 if missing else 4)
    assert len(errors) == 1
    assert ("404" in str(errors[0])) == missing and ("after 4 attempts" in str(errors[0])) != missing


def test_a_missing_fsspec_file_is_tried_once(tmp_path, caplog):
    errors: list = []
    list(read_shard(f"file://{tmp_path}/nowhere.tar", errors.append, retries=3, backoff_s=0.01))
    assert len(errors) == 1 and "attempts" not in str(errors[0])
    assert not any("retry" in record.getMessage() for record in caplog.records)


class _Stuck:
    """A file whose read blocks until `release` is set, as a dead connection of an object store does."""

    def __init__(self, release: threading.Event) -> None:
        self.release, self.reads = release, 0

    def read(self, size: int) -> bytes:
        self.reads += 1
        if self.reads == 1:
            return b"x" * 10
        self.release.wait()
        return b""

    def __enter__(self) -> _Stuck:
        return self

    def __exit__(self, *args: object) -> None:
        pass


def test_a_blocked_object_store_read_times_out():
    release = threading.Event()
    stream = ThreadedStream(lambda: _Stuck(release), timeout_s=0.5)
    try:
        assert stream.read(4) == b"xxxx" and stream.read(6) == b"xxxxxx"
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="read timeout"):
            stream.read(1)
        assert time.monotonic() - start < 6.0
    finally:
        release.set()


def test_an_opener_error_reaches_the_reader():
    def fails() -> None:
        raise FileNotFoundError("nowhere.tar")

    with pytest.raises(FileNotFoundError, match="nowhere.tar"):
        ThreadedStream(fails, timeout_s=5).read(1)


# A process that opens a pipeline command, prints the pids of its group, then waits to be killed.
_HOLDER = """
import os, signal, sys, time
import psutil
from vlmtrain.data.streams import CommandStream
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a data worker does: its commands must still die
stream = CommandStream(shell="sleep 1000 | sleep 1001", timeout_s=100)
time.sleep(0.5)
group = [p.pid for p in psutil.process_iter() if os.getpgid(p.pid) == stream.proc.pid]
print(" ".join(map(str, group)), flush=True)
time.sleep(1000)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_pipe_command_and_its_pipeline_die_with_the_reader_even_on_sigkill():
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        group = [int(pid) for pid in holder.stdout.readline().split()]
        names = sorted(psutil.Process(pid).name() for pid in group)
        assert names == ["sh", "sleep", "sleep"], names
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in group) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in group)
    finally:
        holder.kill()


def test_a_command_failure_still_reports_its_status_and_a_finished_one_its_bytes(tmp_path):
    stream = CommandStream(shell="printf abc; exit 3", timeout_s=5)
    assert stream.read() == b"abc"
    with pytest.raises(OSError, match="status 3"):
        stream.close()
    stream = CommandStream(["printf", "xyz"], timeout_s=5)
    assert stream.read(2) == b"xy" and stream.read(5) == b"z" and stream.read(1) == b""
    stream.close()
