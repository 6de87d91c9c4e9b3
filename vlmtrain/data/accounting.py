"""Counting what the stream skips, by reason, and stopping a run whose data is mostly broken.

Reasons: `image` (the image is missing, does not decode, or has more pixels than
data.max_image_pixels), `caption` (missing, empty or not UTF-8),
`truncated` (a tar that yields some samples, then fails or ends short of what sizes.json lists),
`unreadable` (a tar that yields none: it cannot be opened or fetched, or has zero bytes). Counts are cumulative per slot and ride in its cursor, so they survive a resume.
"""

from __future__ import annotations

import logging

from vlmtrain.data.cursor import REASONS

log = logging.getLogger("vlmtrain")
WARNED_SAMPLES = 20  # warning lines per data worker; after these, bad samples are counted only
MIN_SAMPLES_CHECKED = 1000  # the bad fraction means little before this many samples were read
COUNTS = (*REASONS, "samples_read")
WORST_KEPT = 8  # shards with the most bad samples, kept per slot to name in the stop line


class DataError(RuntimeError):
    """The data cannot feed the run (too many bad samples, a source with no readable shard, a rank's loader
    failed mid-run): one line. Not a config error: the run's command exits 3, not 2."""


class Warner:
    """One warning line per bad sample or shard, up to `limit`; then one line saying the rest are counted."""

    def __init__(self, limit: int = WARNED_SAMPLES) -> None:
        self.left = limit

    def __call__(self, message: str, *args: object) -> None:
        if self.left > 0:
            log.warning(message, *args)
        elif self.left == 0:
            log.warning("more bad samples in this data worker are counted only (data/bad_* in metrics)")
        self.left -= 1


def total(counts: list[dict[str, int]]) -> dict[str, int]:
    return {name: sum(int(c.get(name, 0)) for c in counts) for name in COUNTS}


def bad_fraction(counts: dict[str, int]) -> float:
    """Samples skipped (image or caption) over samples read; a bad shard's lost samples were never read."""
    return (counts["image"] + counts["caption"]) / max(counts["samples_read"], 1)


def worst_shards(tables: list[dict[str, int]], keep: int = WORST_KEPT) -> dict[str, int]:
    """The `keep` shards with the most bad samples over several url -> count tables (summed)."""
    summed: dict[str, int] = {}
    for table in tables:
        for url, count in table.items():
            summed[url] = summed.get(url, 0) + int(count)
    return dict(sorted(summed.items(), key=lambda item: (-item[1], item[0]))[:keep])


def too_many_bad(counts: dict[str, int], limit: float, final: bool = False) -> bool:
    """Whether enough samples were read (or the run ended) and more than `limit` of them were bad."""
    enough = counts["samples_read"] >= MIN_SAMPLES_CHECKED or final
    return enough and bad_fraction(counts) > limit


def bad_data_error(counts: dict[str, int], limit: float, worst: dict[str, int]) -> DataError:
    """The one line that stops a run on bad data, naming the fraction, the reasons and the worst shards."""
    named = ", ".join(f"{url} ({count})" for url, count in list(worst.items())[:3]) or "none recorded"
    return DataError(
        f"data.max_bad_fraction: {bad_fraction(counts):.1%} of {counts['samples_read']} samples read "
        f"were bad ({describe(counts)}), more than {limit:.1%}; worst shards: {named}; fix the shards "
        "or raise data.max_bad_fraction"
    )


def describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts[reason]} {reason}" for reason in REASONS)


def summary_line(counts: dict[str, int]) -> str:
    return f"data: {counts['samples_read']} samples read; bad: {describe(counts)}"


def worker_message(text: str) -> str:
    """The one line a data worker raised, out of the traceback the DataLoader wraps it in."""
    marker = f"{DataError.__name__}: "
    lines = [line.split(marker, 1)[1] for line in text.splitlines() if marker in line]
    return lines[-1] if lines else text.strip().splitlines()[-1]
