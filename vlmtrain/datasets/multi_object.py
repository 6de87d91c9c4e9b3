"""A caption-diversity task: every image holds several objects, every caption names only one of them.

Classes are five colours x a set of shapes (circle and square by default: ten classes), drawn at random
cells of a 3x3 grid (`vlmtrain.datasets.synthetic`'s drawing). A training image holds `objects` shapes of distinct classes; its `.txt` has one caption per
object ("a photo of a red circle."), and the loader picks one of them per epoch, so the captions that
match an image differ in what they name. That is the diversity Llip's caption-conditioned image
embedding is built for: one image vector (CLIP, SigLIP) has to sit near all of its captions at once.

The held-out `test/` split has the same kind of images with their classes in `.json`; multi-object
recall (`vlmtrain.eval.multi_object`) asks whether an image's objects are its top-`objects` classes.
Deterministic given a seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from vlmtrain.atomic import staged_folder
from vlmtrain.datasets.synthetic import COLOURS, SHAPES, Shape, draw, png_bytes, write_shards

DEFAULT_SHAPES = ("circle", "square")


def class_names(shapes: tuple[str, ...] = DEFAULT_SHAPES) -> tuple[str, ...]:
    """Every colour with every shape in `shapes` (any of `vlmtrain.datasets.synthetic.SHAPES`)."""
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown or not shapes or len(set(shapes)) < len(shapes):
        raise ValueError(f"shapes: expected distinct names among {SHAPES}, got {list(shapes)}")
    return tuple(f"{colour} {shape}" for colour in COLOURS for shape in shapes)


CLASSES = class_names()
TEMPLATES = ("a photo of a {c}.", "a {c}.", "a picture with a {c}.")


def random_objects(rng: random.Random, count: int, classes: tuple[str, ...] = CLASSES) -> list[Shape]:
    """`count` shapes of distinct classes in distinct cells."""
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], count)
    names = rng.sample(classes, count)
    return [Shape(*name.split(), cell, rng.random() < 0.5) for name, cell in zip(names, cells)]


def _samples(
    rng: random.Random, count: int, objects: int, prefix: str, classes: tuple[str, ...]
) -> list[dict]:
    samples = []
    for i in range(count):
        shapes = random_objects(rng, objects, classes)
        captions = [rng.choice(TEMPLATES).format(c=s.name) for s in shapes]
        meta = {"classes": [classes.index(s.name) for s in shapes]}
        samples.append(
            {
                "__key__": f"{prefix}{i:08d}",
                "png": png_bytes(draw(shapes, rng)),
                "txt": "\n".join(captions),
                "json": json.dumps(meta),
            }
        )
    return samples


def write_multi_object(
    out: str | Path,
    *,
    train_samples: int,
    test_samples: int,
    objects: int = 2,
    shapes: tuple[str, ...] = DEFAULT_SHAPES,
    seed: int = 0,
) -> Path:
    """Write train/ (caption shards), test/ (images with their classes), classnames.txt and
    zeroshot_classification_templates.txt under `out`, atomically."""
    classes = class_names(tuple(shapes))
    limit = min(9, len(classes))  # a 3x3 grid, distinct classes
    if not 1 <= objects <= limit:
        raise ValueError(
            f"objects: expected 1 to {limit} per image with {len(classes)} classes, got {objects}"
        )
    info = {"objects": objects, "shapes": list(shapes)}
    return write_task(
        out,
        lambda rng, count, prefix: _samples(rng, count, objects, prefix, classes),
        classes=classes,
        sizes=(train_samples, test_samples),
        info=info,
        seed=seed,
    )


def write_task(
    out: str | Path,
    samples: Callable[[random.Random, int, str], list[dict]],
    *,
    classes: tuple[str, ...],
    sizes: tuple[int, int],
    info: dict,
    seed: int,
    templates: tuple[str, ...] = TEMPLATES,
) -> Path:
    """Write a multi-object task under `out`, atomically: train/ (caption shards) and test/ (images with
    their classes) of `sizes` samples each from `samples(rng, count, key prefix)`, one generator seeded
    with `seed` drawing train/ first; classnames.txt, zeroshot_classification_templates.txt and
    info.json (`info` with the sizes and the seed)."""
    out = Path(out).expanduser()
    rng = random.Random(seed)
    train_samples, test_samples = sizes
    with staged_folder(out) as staging:
        for split, count, prefix in (("train", train_samples, "t"), ("test", test_samples, "e")):
            (staging / split).mkdir(parents=True)
            write_shards(str(staging / split / "%06d.tar"), samples(rng, count, prefix))
        (staging / "classnames.txt").write_text("\n".join(classes) + "\n")
        (staging / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
        info = {"train_samples": train_samples, "test_samples": test_samples, **info, "seed": seed}
        (staging / "info.json").write_text(json.dumps(info))
    return out
