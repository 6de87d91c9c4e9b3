"""A caption-diversity task: every image holds several objects, every caption names only one of them.

Ten classes (five colours x circle/square) drawn at random cells of a 3x3 grid (`vlmtrain.datasets.synthetic`'s
drawing). A training image holds `objects` shapes of distinct classes; its `.txt` has one caption per
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
from pathlib import Path

from vlmtrain.atomic import staged_folder
from vlmtrain.datasets.synthetic import Shape, draw, png_bytes, write_shards

CLASSES = tuple(
    f"{colour} {shape}"
    for colour in ("red", "green", "blue", "yellow", "purple")
    for shape in ("circle", "square")
)
TEMPLATES = ("a photo of a {c}.", "a {c}.", "a picture with a {c}.")


def random_objects(rng: random.Random, count: int) -> list[Shape]:
    """`count` shapes of distinct classes in distinct cells."""
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], count)
    names = rng.sample(CLASSES, count)
    return [Shape(*name.split(), cell, rng.random() < 0.5) for name, cell in zip(names, cells)]


def _samples(rng: random.Random, count: int, objects: int, prefix: str) -> list[dict]:
    samples = []
    for i in range(count):
        shapes = random_objects(rng, objects)
        captions = [rng.choice(TEMPLATES).format(c=s.name) for s in shapes]
        meta = {"classes": [CLASSES.index(s.name) for s in shapes]}
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
    out: str | Path, *, train_samples: int, test_samples: int, objects: int = 2, seed: int = 0
) -> Path:
    """Write train/ (caption shards), test/ (images with their classes), classnames.txt and
    zeroshot_classification_templates.txt under `out`, atomically."""
    if not 1 <= objects <= 9:
        raise ValueError(f"objects: expected 1 to 9 per image (a 3x3 grid), got {objects}")
    out = Path(out).expanduser()
    rng = random.Random(seed)
    with staged_folder(out) as staging:
        for split, count, prefix in (("train", train_samples, "t"), ("test", test_samples, "e")):
            (staging / split).mkdir(parents=True)
            write_shards(str(staging / split / "%06d.tar"), _samples(rng, count, objects, prefix))
        (staging / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
        (staging / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
        info = {
            "train_samples": train_samples,
            "test_samples": test_samples,
            "objects": objects,
            "seed": seed,
        }
        (staging / "info.json").write_text(json.dumps(info))
    return out
