"""A learnable image-caption dataset drawn on the fly: coloured shapes at grid positions.

Every image holds one to three shapes, each in its own cell of a 3x3 grid. Each image has
several true captions that describe different objects or attributes, so caption diversity is
real. A held-out retrieval split and a zero-shot classification split (one shape per image,
class = colour + shape, CLIP_benchmark layout) come with it. Deterministic given a seed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlmtrain.atomic import staged_folder

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 50),
    "purple": (160, 60, 200),
}
SHAPES = ("circle", "square", "triangle", "cross")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
TEMPLATES = (
    "a photo of a {c}.",
    "a {c}.",
    "a drawing of a {c}.",
    "a picture with a {c}.",
)
SAMPLES_PER_SHARD = 1000
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    cell: tuple[int, int]
    large: bool

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def place(self) -> str:
        row, col = self.cell
        if (row, col) == (1, 1):
            return "center"
        if row == 1:
            return COLS[col]
        if col == 1:
            return ROWS[row]
        return f"{ROWS[row]} {COLS[col]}"


def class_names() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def random_shapes(rng: random.Random, count: int) -> list[Shape]:
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], count)
    return [Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), cell, rng.random() < 0.5) for cell in cells]


def draw(shapes: list[Shape], rng: random.Random, size: int = 64) -> Image.Image:
    background = tuple(rng.randint(10, 60) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    cell = size / 3
    for s in shapes:
        radius = cell * (0.45 if s.large else 0.3)
        cx = (s.cell[1] + 0.5) * cell + rng.uniform(-1.5, 1.5)
        cy = (s.cell[0] + 0.5) * cell + rng.uniform(-1.5, 1.5)
        fill = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLOURS[s.colour])
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if s.shape == "circle":
            pen.ellipse(box, fill=fill)
        elif s.shape == "square":
            pen.rectangle(box, fill=fill)
        elif s.shape == "triangle":
            pen.polygon(
                [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill
            )
        else:
            arm = radius / 3
            pen.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=fill)
            pen.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=fill)
    return image


def captions(shapes: list[Shape]) -> list[str]:
    """Several true captions: each object alone (with and without attributes), then all of them."""
    out = []
    for s in shapes:
        size = "large" if s.large else "small"
        out.append(f"a {s.name} at the {s.place}")
        out.append(f"a {size} {s.name}")
    out.append(" and ".join(f"a {s.name}" for s in shapes))
    return out


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(pattern: str, samples: list[dict]) -> None:
    """Write shards plus the `sizes.json` (shard name -> sample count) that readers use for lengths."""
    with wds.ShardWriter(pattern, maxcount=SAMPLES_PER_SHARD, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    counts = [SAMPLES_PER_SHARD] * (len(samples) // SAMPLES_PER_SHARD)
    if len(samples) % SAMPLES_PER_SHARD:
        counts.append(len(samples) % SAMPLES_PER_SHARD)
    sizes = {os.path.basename(pattern % i): n for i, n in enumerate(counts)}
    (Path(pattern).parent / "sizes.json").write_text(json.dumps(sizes, indent=1))


def _caption_samples(rng: random.Random, count: int, prefix: str, bar: tqdm) -> list[dict]:
    samples = []
    for i in range(count):
        bar.update()
        shapes = random_shapes(rng, rng.randint(1, 3))
        meta = {"objects": [{"colour": s.colour, "shape": s.shape, "place": s.place} for s in shapes]}
        samples.append(
            {
                "__key__": f"{prefix}{i:08d}",
                "png": png_bytes(draw(shapes, rng)),
                "txt": "\n".join(captions(shapes)),
                "json": json.dumps(meta),
            }
        )
    return samples


def _class_samples(rng: random.Random, count: int, bar: tqdm) -> list[dict]:
    names = class_names()
    samples = []
    for i in range(count):
        bar.update()
        shape = random_shapes(rng, 1)[0]
        samples.append(
            {
                "__key__": f"c{i:08d}",
                "png": png_bytes(draw([shape], rng)),
                "cls": str(names.index(shape.name)),
            }
        )
    return samples


def write_synthetic(out: str | Path, train_samples: int, val_samples: int, seed: int = 0) -> Path:
    """Write train/, val/ (retrieval) and classification/ (zero-shot) splits under `out`, atomically."""
    out = Path(out).expanduser()
    with staged_folder(out) as staging:
        _write_splits(staging, train_samples, val_samples, seed)
    return out


def _write_splits(staging: Path, train_samples: int, val_samples: int, seed: int) -> None:
    rng = random.Random(seed)
    # a bar on a terminal only (disable=None): writing the default 20000 samples takes a while
    bar = tqdm(total=train_samples + 2 * val_samples, desc="synthetic dataset", unit="sample", disable=None)
    for split, count, prefix in (("train", train_samples, "t"), ("val", val_samples, "v")):
        (staging / split).mkdir(parents=True)
        write_shards(str(staging / split / "%06d.tar"), _caption_samples(rng, count, prefix, bar))
    classification = staging / "classification"
    (classification / "test").mkdir(parents=True)
    write_shards(str(classification / "test" / "%d.tar"), _class_samples(rng, val_samples, bar))
    bar.close()
    (classification / "classnames.txt").write_text("\n".join(class_names()) + "\n")
    (classification / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    nshards = len(list((classification / "test").glob("*.tar")))
    (classification / "test" / "nshards.txt").write_text(f"{nshards}\n")
    info = {
        "version": FORMAT_VERSION,
        "train_samples": train_samples,
        "val_samples": val_samples,
        "seed": seed,
    }
    (staging / "info.json").write_text(json.dumps(info))


def ensure_synthetic(root: str | Path, train_samples: int, val_samples: int, seed: int = 0) -> Path:
    """Return `root`, writing the dataset first unless an identical one is already there."""
    root = Path(root).expanduser()
    info = root / "info.json"
    wanted = {
        "version": FORMAT_VERSION,
        "train_samples": train_samples,
        "val_samples": val_samples,
        "seed": seed,
    }
    if info.exists() and json.loads(info.read_text()) == wanted:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("vlmtrain").info(
        "writing the built-in synthetic dataset (%d train, %d val samples) to %s; later runs reuse it",
        train_samples, val_samples, root,
    )  # fmt: skip
    return write_synthetic(root, train_samples, val_samples, seed)
