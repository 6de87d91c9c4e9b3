"""Finding shards: brace patterns, directories, '::'-joined lists; one-line errors for missing ones."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_expander


def expand_shards(spec: str | list[str], key: str = "data.train_shards") -> list[str]:
    """Expand `spec` into existing tar files; raise naming `key` and the first missing path."""
    parts = spec if isinstance(spec, list) else str(spec).split("::")
    shards: list[str] = []
    for part in parts:
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
    """Sample counts from each directory's sizes.json, or None if any shard is not listed."""
    sizes: dict[str, int] = {}
    for shard in shards:
        path = Path(shard)
        table = path.parent / "sizes.json"
        if not table.exists():
            return None
        listed = json.loads(table.read_text())
        if path.name not in listed:
            return None
        sizes[shard] = int(listed[path.name])
    return sizes


def read_shard(shard: str, on_error: callable) -> Iterator[dict]:
    """Raw samples of one tar ({'__key__', ext: bytes, ...}); read errors go to `on_error`."""
    with open(shard, "rb") as stream:
        files = tar_file_expander([{"stream": stream, "url": shard}], handler=on_error)
        yield from group_by_keys(files, handler=on_error)
