"""Where a shard lives and how its bytes are opened.

A shard is a local path, a `pipe:COMMAND` whose stdout is the tar, an http(s) URL (read by curl), or
an fsspec URL (`s3://`, `gs://`, `file://`, `memory://`, ...) whose filesystem package is installed.
The openers are webdataset's (`gopen`, its `Pipe`) and fsspec's.
"""

from __future__ import annotations

import re
import shutil
from typing import BinaryIO

import fsspec
from fsspec.registry import known_implementations
from webdataset.gopen import Pipe, gopen

from vlmtrain.schema import ConfigError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
HTTP = ("http", "https")


def url_scheme(shard: str) -> str | None:
    """'pipe', 'http', 's3', ... for a URL; None for a local path."""
    if shard.startswith("pipe:"):
        return "pipe"
    match = _SCHEME.match(shard)
    return match.group(1).lower() if match else None


def is_url(shard: str) -> bool:
    return url_scheme(shard) is not None


def check_opener(url: str, key: str) -> None:
    """Raise one line naming `key` if nothing installed here can open `url`'s scheme."""
    scheme = url_scheme(url)
    if scheme in HTTP and shutil.which("curl") is None:
        raise ConfigError(f"{key}: {scheme}:// shards are read with curl, which is not installed")
    if scheme is None or scheme == "pipe" or scheme in HTTP:
        return
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError:
        target = known_implementations.get(scheme, {}).get("class", scheme)
        package = target.split(".")[0]
        raise ConfigError(
            f"{key}: {scheme}:// URLs need the fsspec implementation {package} (pip install {package})"
        ) from None
    except ValueError:
        raise ConfigError(
            f"{key}: unknown URL scheme {scheme}:// in {url} "
            "(local paths, pipe:, http(s):// and fsspec URLs are read)"
        ) from None


def open_shard(shard: str) -> BinaryIO:
    """A binary stream of the shard's bytes, read front to back."""
    scheme = url_scheme(shard)
    if scheme is None:
        return open(shard, "rb")
    if scheme == "pipe":
        return gopen(shard, "rb")
    if scheme in HTTP:
        # webdataset's own curl opener retries inside curl (30 x 2 s) and cannot rewind a stream it
        # already wrote to; without --retry, failures reach read_shard, which retries with backoff.
        command = ["curl", "--connect-timeout", "30", "--fail", "--silent", "--show-error", "--location"]
        return Pipe([*command, shard], mode="rb", bufsize=1 << 16, ignore_status=[141, 23])
    return fsspec.open(shard, "rb").open()


# curl's exit statuses that a shard read meets most (man curl, EXIT CODES)
CURL_EXITS = {
    6: "could not resolve host",
    7: "could not connect",
    18: "transfer cut short",
    22: "HTTP error (status >= 400)",
    28: "timed out",
    56: "connection reset",
}


def exit_reason(command: str, status: int) -> str:
    """A failed pipe's exit status in words."""
    if "'curl'" in command and status in CURL_EXITS:
        return f"curl exit {status}: {CURL_EXITS[status]}"
    return f"command exited with status {status}"
