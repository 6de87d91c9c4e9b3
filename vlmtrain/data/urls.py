"""Where a shard lives and how its bytes are opened.

A shard is a local path, a `pipe:COMMAND` whose stdout is the tar, an http(s) URL (read by curl), or
an fsspec URL (`s3://`, `gs://`, `file://`, `memory://`, ...) whose filesystem package is installed.
Every remote read has a deadline (vlmtrain.data.streams); a failure that another try cannot mend (HTTP
403, 404, 410; no such file) is marked permanent, so it is not retried.
"""

from __future__ import annotations

import re
import shutil
from typing import BinaryIO

import fsspec
from fsspec.registry import known_implementations

from vlmtrain.data.streams import CommandFailed, CommandStream, ThreadedStream
from vlmtrain.schema import ConfigError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
HTTP = ("http", "https")
PERMANENT_HTTP = (403, 404, 410)  # forbidden, not found, gone: asking again gets the same answer
_CURL_STATUS = re.compile(r"returned error: (\d{3})")


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


def open_shard(shard: str, timeout_s: float = 60.0) -> BinaryIO:
    """A binary stream of the shard's bytes, read front to back; a remote one raises TimeoutError once
    `timeout_s` seconds pass without a byte."""
    scheme = url_scheme(shard)
    if scheme is None:
        return open(shard, "rb")
    if scheme == "pipe":
        return CommandStream(shell=shard[len("pipe:") :], timeout_s=timeout_s, accepted=(0, 141))
    if scheme in HTTP:
        # no --retry: failures reach read_shard, which retries with backoff and skips what was read
        connect = f"{min(30.0, timeout_s):g}"
        command = ["curl", "--connect-timeout", connect, "--fail", "--silent", "--show-error", "--location"]
        return CommandStream([*command, shard], timeout_s=timeout_s, accepted=(0, 141, 23))
    return ThreadedStream(lambda: fsspec.open(shard, "rb").open(), timeout_s)


def is_permanent(error: BaseException) -> bool:
    """Whether reading again cannot help: no such file, no permission, or HTTP 403/404/410."""
    if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError):
        return True
    if isinstance(error, CommandFailed) and error.status == 22:  # curl --fail: HTTP status >= 400
        found = _CURL_STATUS.search(error.detail)
        return found is not None and int(found.group(1)) in PERMANENT_HTTP
    return False


# curl's exit statuses that a shard read meets most (man curl, EXIT CODES)
CURL_EXITS = {
    6: "could not resolve host",
    7: "could not connect",
    18: "transfer cut short",
    22: "HTTP error (status >= 400)",
    28: "timed out",
    56: "connection reset",
}


def exit_reason(error: CommandFailed) -> str:
    """A failed command's exit status in words."""
    if error.command.startswith("curl ") and error.status in CURL_EXITS:
        found = _CURL_STATUS.search(error.detail)
        http = f" {found.group(1)}" if found and error.status == 22 else ""
        return f"curl exit {error.status}: {CURL_EXITS[error.status]}{http}"
    return f"command exited with status {error.status}"
