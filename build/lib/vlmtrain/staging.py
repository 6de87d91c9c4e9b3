"""Folders written atomically: build the content in a scratch folder beside the target, then rename it
into place, so a reader sees the old folder or the whole new one and a crash leaves no half-written
output (only a hidden scratch folder, replaced by the next attempt)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
