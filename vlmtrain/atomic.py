"""Files and folders written atomically: the content goes to a hidden scratch file or folder beside the
target, which is then renamed into place, so a reader sees the old version or the whole new one and a
crash leaves no half-written output (only a hidden scratch entry, replaced or swept by the next attempt).
Every atomic write of the project goes through here."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def scratch_name(path: Path) -> Path:
    """The hidden file a write of `path` goes to first (`.<name>.tmp<pid>`)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(handle)` on a scratch file beside `path`, flush it to disk, then rename it over `path`:
    the file is always whole, old or new. On any error (a full disk, an interrupt) no scratch file stays."""
    tmp = scratch_name(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        full = not isinstance(error, OSError) and _nearly_full(tmp.parent)
        tmp.unlink(missing_ok=True)
        if full:  # a writer may report a full disk otherwise (torch's zip writer: a position mismatch)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from error
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda handle: handle.write(text.encode()))


def _nearly_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


@contextmanager
def staged_folder(out: Path, durable: bool = False) -> Iterator[Path]:
    """Yield a scratch folder that replaces `out` only if the block finishes without an error.

    `durable`: flush every file to disk first and give it the usual permissions (exports)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if durable:
            _flush_files(staging)
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _flush_files(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)  # safetensors writes owner-only files
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _replace(staging: Path, out: Path) -> None:
    """Move an existing `out` aside, rename `staging` onto it, then delete the old one."""
    if not out.exists():
        staging.rename(out)
        return
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
