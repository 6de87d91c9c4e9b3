"""A binding task: every object is painted in two colours, every caption names one object's two colours.

A 64 px image holds `objects` circles and squares, each split in half between two colours, at random
cells of a 3x3 grid, no colour used twice in an image; each caption names one object ("a photo of a red and
blue shape.", its two colours in random order). The classes are the 28 pairs of 8 colours. Which colours an
image holds says little about which pairs it holds: 2 objects have 4 colours, of which 6 pairs can be made,
so a model that sees the bag of colours and not which go together finds a third of the objects
(`vlmtrain.eval.multi_object.bag_of_colours_recall`; chance is 2/28). To find more, the image's
representation has to keep which colours go together, and for each caption the pair that caption names:
what Llip's caption-conditioned mix is for, and what one image vector (CLIP, SigLIP) must hold for every
caption at once.

The layout is `vlmtrain.datasets.multi_object`'s (train/ caption shards, test/ with the classes, class
names and templates), so multi-object recall scores it. Deterministic given a seed.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from vlmtrain.datasets.multi_object import write_task
from vlmtrain.datasets.synthetic import COLOURS as SYNTHETIC_COLOURS
from vlmtrain.datasets.synthetic import png_bytes

COLOURS = {**SYNTHETIC_COLOURS, "orange": (245, 140, 30), "cyan": (40, 210, 220), "white": (235, 235, 235)}
CLASSES = tuple(f"{a} and {b}" for a, b in itertools.combinations(COLOURS, 2))
TEMPLATES = ("a photo of a {c} shape.", "a {c} shape.", "a picture with a {c} shape.")
CLASS_OF = {frozenset(name.split(" and ")): index for index, name in enumerate(CLASSES)}  # either order
# an object to draw: (its two colours, its (row, column) cell, its shape, halves left|right not top|bottom)
Painted = tuple[tuple[str, str], tuple[int, int], str, bool]


def _jittered(rng: random.Random, colour: str) -> tuple[int, ...]:
    return tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLOURS[colour])


def draw(objects: list[Painted], rng: random.Random, size: int = 64) -> Image.Image:
    """Each object a circle or a square of radius 0.45 cell, its halves (left|right or top|bottom) in its two
    colours, on a dark background."""
    image = Image.new("RGB", (size, size), tuple(rng.randint(10, 60) for _ in range(3)))
    pen = ImageDraw.Draw(image)
    cell = size / 3
    for (first, second), (row, col), shape, vertical in objects:
        radius = cell * 0.45
        cx = (col + 0.5) * cell + rng.uniform(-1.5, 1.5)
        cy = (row + 0.5) * cell + rng.uniform(-1.5, 1.5)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        one, two = _jittered(rng, first), _jittered(rng, second)
        if shape == "circle":
            start = 90 if vertical else 180
            pen.pieslice(box, start, start + 180, fill=one)
            pen.pieslice(box, start + 180, start + 360, fill=two)
        elif vertical:
            pen.rectangle((box[0], box[1], cx, box[3]), fill=one)
            pen.rectangle((cx, box[1], box[2], box[3]), fill=two)
        else:
            pen.rectangle((box[0], box[1], box[2], cy), fill=one)
            pen.rectangle((box[0], cy, box[2], box[3]), fill=two)
    return image


def _samples(rng: random.Random, count: int, objects: int, prefix: str) -> list[dict]:
    samples = []
    for i in range(count):
        colours = rng.sample(list(COLOURS), 2 * objects)
        pairs = [(colours[2 * j], colours[2 * j + 1]) for j in range(objects)]
        cells = rng.sample([(r, c) for r in range(3) for c in range(3)], objects)
        painted = [
            (p, cell, rng.choice(["circle", "square"]), rng.random() < 0.5) for p, cell in zip(pairs, cells)
        ]
        classes = [CLASS_OF[frozenset(pair)] for pair in pairs]
        captions = []
        for pair in pairs:
            first, second = pair if rng.random() < 0.5 else pair[::-1]
            captions.append(rng.choice(TEMPLATES).format(c=f"{first} and {second}"))
        samples.append(
            {
                "__key__": f"{prefix}{i:08d}",
                "png": png_bytes(draw(painted, rng)),
                "txt": "\n".join(captions),
                "json": json.dumps({"classes": classes}),
            }
        )
    return samples


def write_colour_pairs(
    out: str | Path, *, train_samples: int, test_samples: int, objects: int = 2, seed: int = 0
) -> Path:
    """Write the task under `out` (`vlmtrain.datasets.multi_object.write_task`'s layout), atomically."""
    limit = len(COLOURS) // 2
    if not 1 <= objects <= limit:
        raise ValueError(f"objects: expected 1 to {limit} per image ({len(COLOURS)} colours), got {objects}")
    return write_task(
        out,
        lambda rng, count, prefix: _samples(rng, count, objects, prefix),
        classes=CLASSES,
        sizes=(train_samples, test_samples),
        info={"objects": objects, "task": "colour pairs"},
        seed=seed,
        templates=TEMPLATES,
    )
