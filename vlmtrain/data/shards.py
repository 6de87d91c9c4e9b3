"""Finding shards and reading them: brace patterns, directories, '::'-joined lists and URLs; retries for
remote shards, one report for a shard that cannot be read."""

from __future__ import annotations

import json
import logging
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, BinaryIO

import braceexpand
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys

from vlmtrain.data.streams import CommandFailed
from vlmtrain.data.tar import BLOCK, COMPRESSED, tar_files
from vlmtrain.data.urls import check_opener, exit_reason, is_permanent, is_url, open_shard
from vlmtrain.schema import DataConfig

log = logging.getLogger(__name__)
_JOINS = re.compile(r"::(?![^\[]*\])")  # '::' between shards, not inside an IPv6 host like [::1]


class ShardUnreadable(OSError):
    """A shard that is corrupt, or still failing after its retries; the message starts with its URL."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url


def expand_shards(spec: str | list[str], key: str = "data.train_shards") -> list[str]:
    """Expand `spec` into shards. Local ones must exist (else one line naming `key` and the first missing
    path); URLs are brace-expanded without being opened, after checking that their scheme can be read."""
    parts = spec if isinstance(spec, list) else _JOINS.split(str(spec))
    shards: list[str] = []
    for part in parts:
        if is_url(part):
            check_opener(part, key)
            shards += braceexpand.braceexpand(part)
            continue
        path = Path(part).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"{key}: no .tar shards in directory {path}")
            shards += found
            continue
        for name in braceexpand.braceexpand(str(path)):
            if not Path(name).is_file():
                raise FileNotFoundError(f"{key}: no such shard {name}")
            shards.append(name)
    if not shards:
        raise FileNotFoundError(f"{key}: pattern {spec!r} names no shards")
    return shards


def shard_sizes(shards: list[str]) -> dict[str, int] | None:
    """Sample counts from each directory's sizes.json or img2dataset's `<shard>_stats.json` ("successes"),
    or None if any shard is remote or not listed."""
    sizes: dict[str, int] = {}
    tables: dict[Path, dict[str, Any]] = {}  # one read of each directory's sizes.json
    for shard in shards:
        if is_url(shard):
            return None
        path = Path(shard)
        if path.parent not in tables:
            table = path.parent / "sizes.json"
            tables[path.parent] = json.loads(table.read_text()) if table.exists() else {}
        stats = path.with_name(f"{path.stem}_stats.json")
        if path.name in tables[path.parent]:
            sizes[shard] = int(tables[path.parent][path.name])
        elif stats.exists():
            sizes[shard] = int(json.loads(stats.read_text())["successes"])
        else:
            return None
    return sizes


def read_options(config: DataConfig) -> dict[str, Any]:
    """The `read_shard` keywords that a data config sets."""
    return {
        "retries": config.shard_retries,
        "backoff_s": config.retry_backoff_s,
        "timeout_s": config.read_timeout_s,
    }


def read_shard(
    url: str,
    on_error: Callable[[Exception], Any],
    retries: int = 3,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
) -> Iterator[dict]:
    """Raw samples of one shard ({'__key__', '__url__', ext: bytes, ...}).

    A URL whose read fails is opened again up to `retries` times, `backoff_s` x 1, 2, 4, ... apart, and
    the samples already yielded are skipped, so none repeats; a remote read that waits `timeout_s`
    seconds for a byte fails. A failure that another try cannot mend (`is_permanent`: HTTP 404, no such
    file) is not retried. A shard that still fails, or a local one that is corrupt (truncated, empty), is
    logged and reported once: `on_error(ShardUnreadable)`. It never raises; the generator ends.
    """
    attempts = 1 + (max(0, retries) if is_url(url) else 0)
    done = 0  # samples yielded so far
    for attempt in range(1, attempts + 1):
        try:
            with closing(_samples(url, timeout_s)) as samples:  # closed at once when the reader stops early
                for index, sample in enumerate(samples):
                    if index >= done:
                        done += 1
                        yield sample
            return
        except Exception as exc:  # any read error: retried if remote, then reported, never raised
            reason = _reason(exc)
            if attempt < attempts and not is_permanent(exc):
                delay = backoff_s * 2 ** (attempt - 1)
                log.warning(
                    "%s: read failed after %d samples (%s); retry %d/%d in %.2g s",
                    url,
                    done,
                    reason,
                    attempt,
                    attempts - 1,
                    delay,
                )
                time.sleep(delay)
                continue
            tries = f" after {attempt} attempts" if attempt > 1 else ""
            error = ShardUnreadable(url, f"unreadable{tries}, skipped after {done} samples: {reason}")
            log.warning("skipping shard %s", error)
            on_error(error)
            return


def _samples(url: str, timeout_s: float) -> Iterator[dict]:
    """One pass over the shard; any error of the tar or of the transfer raises."""
    stream = _Tail(open_shard(url, timeout_s))
    try:
        files = ({"fname": name, "data": data, "__url__": url} for name, data in tar_files(stream))
        yield from group_by_keys(files, handler=reraise_exception)
        while stream.read(1 << 16):  # to the end, so a pipe's command exits and reports its status
            pass
    except Exception as exc:
        failure = _close(stream)
        if failure is not None:  # a command's exit status explains a short tar better than tarfile
            raise failure from exc
        raise
    except BaseException:  # the reader stopped early: its command is stopped too
        stream.abort()
        raise
    stream.close()  # a pipe whose command exited non-zero raises here
    if not stream.ends_with_zero_block():
        # tarfile ends quietly at a cut between two members; a whole tar ends with zero blocks
        raise tarfile.ReadError("no end-of-archive blocks (cut short)")


class _Tail:
    """A read-only stream that keeps its first bytes and its last 512 bytes read."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.head, self.tail = stream, b"", b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if len(self.head) < 8:
            self.head = (self.head + data)[:8]
        self.tail = (self.tail + data)[-BLOCK:] if len(data) < BLOCK else data[-BLOCK:]
        return data

    def ends_with_zero_block(self) -> bool:
        """True for a whole tar; a compressed one (.tar.gz, ...) is checked by its decompressor instead."""
        compressed = self.head.startswith(COMPRESSED)
        return compressed or (len(self.tail) == BLOCK and not any(self.tail))

    def close(self) -> None:
        self.stream.close()

    def abort(self) -> None:
        """Close without waiting for a transfer to finish or caring how its command exits."""
        abort = getattr(self.stream, "abort", None)
        if abort is not None:  # a command: its whole process group is killed
            abort()
        _close(self.stream)

    def __repr__(self) -> str:
        return repr(self.stream)


def _close(stream: BinaryIO) -> Exception | None:
    try:
        stream.close()
    except Exception as exc:
        return exc
    return None


def _reason(exc: BaseException) -> str:
    """The error as one short line (webdataset appends the stream and URL to its arguments)."""
    if isinstance(exc, CommandFailed):
        return exit_reason(exc)
    first = exc.args[0] if exc.args else ""
    text = " ".join(str(first).split(" @ ")[0].split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
