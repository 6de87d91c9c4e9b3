"""Multi-object recall: does a model rank all of an image's objects above the classes it lacks?

On a `vlmtrain.datasets.multi_object` test split, each image's classes are scored with the model's own
zero-shot classifier (class prompts averaged by `model.average_text`, scored by `model.similarity`: a
Llip model mixes its image tokens once per class). Recall is the share of an image's k objects found
among its k best-scoring classes, averaged over images; chance is k / number of classes.

`colour_only_recall` is the recall of a model that sees each object's colour but not its shape (it ranks
the classes of the image's colours first, in random order): a model at that level has learned colours only.
`bag_of_colours_recall` is its like for the colour pairs of `vlmtrain.datasets.colour_pairs`: a model
that sees an image's colours but not which go together. `same_colour_pair_accuracy` asks the shape
question directly, and `prompt_cosine` whether the text side has collapsed (every class prompt on one
direction).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmtrain.data.shards import expand_shards
from vlmtrain.data.transforms import decode_image
from vlmtrain.eval.zeroshot import model_device, raw_samples, read_task, text_classifier


def _batches(root: Path, transform: Callable, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, (B, k) class indices) from `root`/test."""
    images, classes = [], []
    for raw in _test_samples(root):
        images.append(transform(decode_image(raw)))
        classes.append(json.loads(raw["json"])["classes"])
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(classes)
            images, classes = [], []
    if images:
        yield torch.stack(images), torch.tensor(classes)


@torch.no_grad()
def multi_object_recall(
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    root: str | Path,
    *,
    temperature: float | None = None,
    batch_size: int = 256,
) -> float:
    """Mean over test images of |top-k classes ∩ the image's k classes| / k (`temperature`: Llip's
    mixing temperature for scoring; None: the model's own)."""
    root = Path(root).expanduser()
    classifier = text_classifier(model, tokenizer, *read_task(root))
    found, total = 0, 0
    for images, classes in _batches(root, transform, batch_size):
        scores = model.similarity(model.encode_image(images.to(model_device(model))), classifier, temperature)
        top = scores.topk(classes.shape[1], dim=-1).indices.cpu()
        found += (top[:, :, None] == classes[:, None, :]).any(-1).sum().item()
        total += classes.numel()
    return found / total


def colour_only_recall(root: str | Path) -> float:
    """Expected recall of ranking, in random order, the classes ("colour shape") of an image's colours
    first: with m such classes holding all k objects, k/m of the objects are found."""
    return _recall_from_colours(root, lambda name: {name.split()[0]})


def bag_of_colours_recall(root: str | Path) -> float:
    """On a `vlmtrain.datasets.colour_pairs` set (classes "red and blue"), the expected recall of ranking
    first, in random order, every class whose colours the image holds: a model that sees which colours are
    there but not which go together."""
    return _recall_from_colours(root, lambda name: set(name.split(" and ")))


def _recall_from_colours(root: str | Path, colours_of: Callable[[str], set[str]]) -> float:
    """Expected recall of a model that sees an image's colours and nothing else: it ranks first, in random
    order, the m classes whose colours (`colours_of(class name)`) are all in the image, k/m of the
    image's k objects found."""
    root = Path(root).expanduser()
    colours = [colours_of(name) for name in read_task(root)[0]]
    found, total = 0.0, 0
    for classes in (json.loads(raw["json"])["classes"] for raw in _test_samples(root)):
        seen = set().union(*(colours[c] for c in classes))
        candidates = sum(named <= seen for named in colours)
        found += len(classes) ** 2 / candidates
        total += len(classes)
    return found / total


def _test_samples(root: Path) -> Iterator[dict]:
    return raw_samples(expand_shards(str(root / "test"), "multi-object test shards"))


@torch.no_grad()
def same_colour_pair_accuracy(
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    root: str | Path,
    *,
    batch_size: int = 256,
) -> float:
    """Share of (object, other class of its colour) pairs where the object's class scores higher: 0.5 for a
    model blind to shape."""
    root = Path(root).expanduser()
    names, templates = read_task(root)
    classifier = text_classifier(model, tokenizer, names, templates)
    colours = [name.split()[0] for name in names]
    wins, total = 0, 0
    for images, classes in _batches(root, transform, batch_size):
        scores = model.similarity(model.encode_image(images.to(model_device(model))), classifier).cpu()
        for row, objects in zip(scores, classes.tolist()):
            for c in objects:
                rivals = [d for d in range(len(names)) if d != c and colours[d] == colours[c]]
                wins += sum(bool(row[c] > row[d]) for d in rivals)
                total += len(rivals)
    return wins / max(1, total)


@torch.no_grad()
def prompt_cosine(model: torch.nn.Module, tokenizer: Callable, root: str | Path) -> float:
    """Mean cosine between the caption features of different class prompts (every class in every template):
    near 1 when the text tower has collapsed to one direction."""
    names, templates = read_task(Path(root).expanduser())
    prompts = [template.format(c=name) for name in names for template in templates]
    tokens = tokenizer(prompts).to(model_device(model))
    features = F.normalize(model.encode_text(tokens)[:, : model.embed_dim].float(), dim=-1)
    cosines = features @ features.T
    count = len(prompts)
    return ((cosines.sum() - cosines.diagonal().sum()) / (count * (count - 1))).item()
