"""A small real-image dataset with no download: scikit-learn's bundled handwritten digits.

`sklearn.datasets.load_digits` holds 1797 scans (8x8, 17 grey levels) of digits written by 43
people. A stratified split holds some out; the rest become training shards, each scan drawn
several times with a small random rotation, scale and shift (dark ink on white, upsampled), and
captioned several ways ("the number 7", "a handwritten digit seven"). The held-out scans form a
zero-shot classification set (CLIP_benchmark layout) and a retrieval set. Deterministic given a seed.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from vlmtrain.datasets.convert import ShardSink, staged, write_task_files
from vlmtrain.extras import require

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTIONS = (
    "a handwritten digit {word}",
    "the number {n}",
    "a {n} written by hand",
    "the digit {word}",
    "a handwritten {n}",
    "a scan of the number {word}",
)
# Zero-shot prompts: close to the caption style, none identical to a caption.
TEMPLATES = (
    "a handwritten {c}.",
    "the number {c}.",
    "a photo of the digit {c}.",
    "a {c}, written by hand.",
)
PLAIN_SCALE = 0.85  # the digit's share of the image side when drawn without augmentation


def load() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) grey levels 0..16 and their labels 0..9; shipped with scikit-learn."""
    datasets = require("sklearn.datasets", "examples", "vlmtrain-data digits", package="scikit-learn")
    digits = datasets.load_digits()
    return digits.images, digits.target


def split(labels: np.ndarray, held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified (train, held-out) indices: each digit keeps its share in both."""
    rng = random.Random(seed)
    train, test = [], []
    for digit in range(10):
        members = [int(i) for i in np.flatnonzero(labels == digit)]
        rng.shuffle(members)
        cut = round(len(members) * held_out)
        test += members[:cut]
        train += members[cut:]
    return sorted(train), sorted(test)


def render(scan: np.ndarray, size: int, rng: random.Random | None = None) -> Image.Image:
    """Dark ink on white at `size` px; with `rng`, a small random rotation, scale and shift."""
    ink = Image.fromarray((255 - scan * (255 / 16)).astype(np.uint8), mode="L")
    scale, shift, angle = PLAIN_SCALE, (0.0, 0.0), 0.0
    if rng is not None:
        scale = rng.uniform(PLAIN_SCALE - 0.12, PLAIN_SCALE + 0.1)
        shift = (rng.uniform(-0.08, 0.08) * size, rng.uniform(-0.08, 0.08) * size)
        angle = rng.uniform(-12, 12)
    inner = round(size * scale)
    canvas = Image.new("L", (size, size), 255)
    corner = [round((size - inner) / 2 + d) for d in shift]
    canvas.paste(ink.resize((inner, inner), Image.Resampling.BICUBIC), tuple(corner))
    return canvas.rotate(angle, Image.Resampling.BICUBIC, fillcolor=255)


def captions(digit: int) -> str:
    return "\n".join(c.format(word=WORDS[digit], n=digit) for c in CAPTIONS)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _train_samples(
    scans: np.ndarray, labels: np.ndarray, indices: list[int], copies: int, size: int, seed: int
) -> Iterator[dict]:
    """Every training scan `copies` times (the first plain), shuffled so each shard mixes all digits."""
    rng = random.Random(f"{seed}-augment")
    jobs = [(i, c) for i in indices for c in range(copies)]
    random.Random(f"{seed}-order").shuffle(jobs)
    for n, (i, copy) in enumerate(jobs):
        image = render(scans[i], size, rng if copy else None)
        meta = json.dumps({"index": i, "copy": copy, "label": int(labels[i])}).encode()
        yield {"__key__": f"{n:07d}", "png": png(image), "txt": captions(labels[i]).encode(), "json": meta}


def write_digits(
    out: str | Path,
    *,
    copies: int = 8,
    size: int = 32,
    held_out: float = 0.22,
    seed: int = 0,
    samples_per_shard: int = 1000,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write train/ (captions), val/ (retrieval) and classification/ (zero-shot) under `out`; return counts."""
    if copies < 1:
        raise ValueError(f"--copies: must be at least 1, got {copies}")
    scans, labels = load()
    train, test = split(labels, held_out, seed)
    with staged(out, overwrite) as staging:
        sink = ShardSink(staging / "train", samples_per_shard)
        for sample in _train_samples(scans, labels, train, copies, size, seed):
            sink.write(sample)
        sink.close()
        val = ShardSink(staging / "val", samples_per_shard)
        zeroshot = ShardSink(staging / "classification" / "test", samples_per_shard, name="{}.tar")
        for i in test:
            image, digit = png(render(scans[i], size)), int(labels[i])
            val.write({"__key__": f"{i:04d}", "png": image, "txt": captions(digit).encode()})
            zeroshot.write({"__key__": f"{i:04d}", "png": image, "cls": str(digit).encode()})
        val.close()
        zeroshot.close()
        write_task_files(staging / "classification", list(WORDS), list(TEMPLATES))
        counts = {"train": len(train) * copies, "train_scans": len(train), "held_out": len(test)}
        info = {**counts, "copies": copies, "size": size, "seed": seed}
        (staging / "info.json").write_text(json.dumps(info, indent=1))
    return counts
