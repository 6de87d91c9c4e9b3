"""What a checkpoint remembers of the shards behind its data position, so that a resume notices data
that changed under it (the cursor is shard indices and sample offsets: on other shards it points at
other samples, and an "exact" resume would silently train on something else).

Kept for each source: its shard list as expanded (a folder's shards, a brace pattern's names, in order)
and, for each local shard, its size and a hash of its first HEAD_BYTES bytes: the first member's tar
header (its name, size and time) and the start of its data. Computed once at start-up by rank 0: one
`stat` and one small read per local shard, in parallel. Remote shards (http(s), pipe:, s3:// and other
fsspec URLs) are compared by their list only: reading them again would cost a transfer (or run a command)
at every start.

So a resume notices: a shard added, removed, renamed or reordered (a file deleted from a folder spec
changes the epoch too), and a local shard replaced by other content of another size or another
beginning. It does not notice a local shard rewritten only past its first HEAD_BYTES bytes with the same
size, nor a remote shard replaced at the same URL.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vlmtrain.data.urls import is_url

log = logging.getLogger("vlmtrain")
HEAD_BYTES = 4096
REMOTE = (-1, "")  # size and head of a shard not read


def fingerprint(sources: list[list[str]]) -> list[dict[str, Any]]:
    """Per source: {"shards": [...], "sizes": [...], "heads": [...]}, plain values a checkpoint holds."""
    local = sorted({shard for shards in sources for shard in shards if not is_url(shard)})
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(local)))) as pool:
        seen = dict(zip(local, pool.map(_size_and_head, local)))
    return [
        {
            "shards": list(shards),
            "sizes": [seen.get(shard, REMOTE)[0] for shard in shards],
            "heads": [seen.get(shard, REMOTE)[1] for shard in shards],
        }
        for shards in sources
    ]


def _size_and_head(path: str) -> tuple[int, str]:
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(HEAD_BYTES)
    return size, hashlib.sha256(head).hexdigest()[:16]


def shard_changes(saved: list[dict[str, Any]], now: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """What differs between two fingerprints, one phrase per change naming the shard, the source's list
    first; `keys` names each source (data.train_shards, data.sources[1].shards)."""
    if len(saved) != len(now):
        return [f"data.sources: {len(saved)} sources then, {len(now)} now"]
    changes: list[str] = []
    for key, old, new in zip(keys, saved, now):
        changes += _list_changes(key, old["shards"], new["shards"]) + _content_changes(key, old, new)
    return changes


def _list_changes(key: str, old: list[str], new: list[str]) -> list[str]:
    if old == new:
        return []
    counts = f"({len(old)} shards then, {len(new)} now)"
    before, after = set(old), set(new)
    changes = [f"{key}: {shard} is gone {counts}" for shard in old if shard not in after]
    changes += [f"{key}: {shard} is new {counts}" for shard in new if shard not in before]
    if not changes:
        moved = next(n for n, (a, b) in enumerate(zip(old, new)) if a != b)
        changes.append(f"{key}: the shards are in another order from {new[moved]} on")
    return changes


def _content_changes(key: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    now = {shard: (size, head) for shard, size, head in zip(new["shards"], new["sizes"], new["heads"])}
    changes = []
    for shard, size, head in zip(old["shards"], old["sizes"], old["heads"]):
        if shard not in now or (size, head) == REMOTE or now[shard] == REMOTE:
            continue
        if now[shard][0] != size:
            changes.append(f"{key}: {shard} changed (size {size} -> {now[shard][0]} bytes)")
        elif now[shard][1] != head:
            changes.append(f"{key}: {shard} changed (its first {HEAD_BYTES} bytes differ)")
    return changes


def resume_refusal(
    saved: list[dict[str, Any]], now: list[dict[str, Any]], *, keys: list[str], checkpoint: str, allow: bool
) -> str | None:
    """The one-line refusal of a resume from `checkpoint` onto changed shards, or None: the same shards,
    or `allow` (data.allow_changed_shards), and then the changes are logged."""
    changes = shard_changes(saved, now, keys)
    if not changes:
        return None
    if allow:
        log.warning("resuming on changed shards (data.allow_changed_shards): %s", "; ".join(changes))
        return None
    more = f" and {len(changes) - 1} more change(s)" if len(changes) > 1 else ""
    return (
        f"data: the shards changed since {checkpoint} ({changes[0]}{more}); its data position cannot be "
        "resumed on other shards: restore them, start a new run_dir, or set data.allow_changed_shards=true "
        "to continue on these"
    )
