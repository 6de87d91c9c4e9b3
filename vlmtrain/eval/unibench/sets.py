"""vlmtrain's evaluation sets as map-style datasets in UniBench's sample layout.

A classification sample is (image, label, key), a relation sample (image, [true caption, *negatives],
key): the tuples UniBench's zero-shot and relation handlers unpack, with the tar sample's key as its
image name. The sets are read in shard order, as vlmtrain-eval reads them, and keep the encoded images.
UniBench hands every benchmark `root=<its benchmarks_dir>`; these sets are found by `location` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from vlmtrain.data.shards import expand_shards, read_shard
from vlmtrain.data.transforms import IMAGE_EXTENSIONS, decode_image
from vlmtrain.eval.relation import relation_samples
from vlmtrain.eval.zeroshot import read_task


def _image_only(raw: dict) -> dict:
    return {ext: raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw}


class ClassificationSet(Dataset):
    """A CLIP_benchmark-style folder (classnames.txt, templates, test/*.tar with `.cls` labels)."""

    def __init__(self, location: str, transform: Callable | None = None, **_: object) -> None:
        self.classes, self.templates = read_task(location)
        shards = expand_shards(str(Path(location).expanduser() / "test"), "zero-shot test shards")
        self.samples = [
            (raw["__key__"], _image_only(raw), int(raw["cls"].decode()))
            for shard in shards
            for raw in read_shard(shard, on_error=lambda exc: False)
        ]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        key, raw, label = self.samples[index]
        image = decode_image(raw)
        return (self.transform(image) if self.transform else image), label, key


class RelationSet(Dataset):
    """Relation shards (vlmtrain.eval.relation): an image, its true caption first, then the wrong ones."""

    def __init__(self, location: str, transform: Callable | None = None, **_: object) -> None:
        self.samples = [
            (key, _image_only(raw), options)
            for key, raw, options in relation_samples(expand_shards(location, "relation shards"))
        ]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[str], str]:
        key, raw, options = self.samples[index]
        image = decode_image(raw)
        return (self.transform(image) if self.transform else image), options, key
