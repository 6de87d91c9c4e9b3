"""Zero-shot classification: class names x prompt templates -> a text classifier (CLIP_benchmark layout).

A dataset directory holds `classnames.txt`, `zeroshot_classification_templates.txt` (templates with
`{c}`) and `test/*.tar` shards whose samples carry an image and a `.cls` label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from vlmtrain.data.shards import expand_shards, read_shard
from vlmtrain.data.transforms import decode_image
from vlmtrain.eval.ranks import Deal, Ranks, batched
from vlmtrain.models.text_encoders import text_columns


def read_task(root: str | Path) -> tuple[list[str], list[str]]:
    root = Path(root).expanduser()
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"zero-shot dataset {root}: missing {name}")
    classnames = [c.strip() for c in (root / "classnames.txt").read_text().splitlines() if c.strip()]
    templates = [t.strip() for t in (root / "zeroshot_classification_templates.txt").read_text().splitlines()]
    return classnames, [t for t in templates if t]


def raw_samples(shards: list[str]) -> Iterator[dict]:
    """Every sample of `shards` as read (undecoded), in shard order; unreadable samples are skipped."""
    for shard in shards:
        yield from read_shard(shard, on_error=lambda exc: False)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_captions(model: torch.nn.Module, tokenizer: Callable, captions: list[str]) -> torch.Tensor:
    """`model.encode_text` of the captions, its text tower handed only the token columns it reads (as in
    training: the same embeddings as over the whole context, less work)."""
    tokens = tokenizer(captions)
    tokens = tokens[:, : text_columns(model.text_encoder, tokens)].contiguous()
    return model.encode_text(tokens.to(model_device(model)))


@torch.no_grad()
def text_classifier(
    model: torch.nn.Module, tokenizer: Callable, classnames: list[str], templates: list[str]
) -> torch.Tensor:
    """One text embedding per class: the model's average over the class's prompts (as CLIP_benchmark),
    the classes shared among the ranks of a process group (a collective: every rank calls it)."""
    prompts = ([[t.format(c=name) for t in templates]] for name in classnames)
    deal = Deal(prompts, Ranks.current())
    rows = [model.average_text(encode_captions(model, tokenizer, batch[0]))[None] for batch, _ in deal]
    return deal.gather(rows)


def classification_metrics(top: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """From (N, k) ranked predictions: top-1, top-5 and mean per-class recall."""
    hit1 = top[:, 0] == target
    per_class = [hit1[target == c].float().mean() for c in target.unique()]
    return {
        "acc1": hit1.float().mean().item(),
        "acc5": (top[:, :5] == target[:, None]).any(-1).float().mean().item(),
        "mean_per_class_recall": torch.stack(per_class).mean().item(),
        "num_samples": int(target.numel()),
    }


def zeroshot_classification(
    model: torch.nn.Module, tokenizer: Callable, transform: Callable, root: str | Path, batch_size: int = 256
) -> dict[str, float]:
    """Top-1, top-5 and mean per-class recall on `root`'s test split."""
    return zeroshot_sweep(model, tokenizer, transform, root, batch_size=batch_size)[None]


@torch.no_grad()
def zeroshot_sweep(
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    root: str | Path,
    *,
    batch_size: int = 256,
    temperatures: Sequence[float | None] = (None,),
    samples: list[dict] | None = None,
) -> dict[float | None, dict[str, float]]:
    """Metrics on `root`'s test split for each Llip mixing temperature (None: the model's own).

    Images are embedded once; only the (chunked) image-class scoring is repeated per temperature. Under
    a process group every rank embeds its share of the images (a collective: every rank calls it).
    `samples`, if given, receives one record per image (key, target, predicted, correct) for the
    model's own temperature, the first of `temperatures`."""
    classnames, templates = read_task(root)
    classifier = text_classifier(model, tokenizer, classnames, templates)
    shards = expand_shards(str(Path(root).expanduser() / "test"), "zero-shot test shards")
    keys, labels = [], []

    def read() -> Iterator[list[dict]]:  # every rank reads every sample's key and label
        for batch in batched(raw_samples(shards), batch_size):
            keys.extend(raw["__key__"] for raw in batch)
            labels.extend(int(raw["cls"].decode()) for raw in batch)
            yield batch

    deal = Deal(read(), Ranks.current())
    ranked: dict[float | None, list[torch.Tensor]] = {tau: [] for tau in temperatures}
    for batch, _ in deal:
        images = torch.stack([transform(decode_image(raw)) for raw in batch])
        embedded = model.encode_image(images.to(model_device(model)))
        for tau in temperatures:
            logits = model.similarity(embedded, classifier, temperature=tau)
            ranked[tau].append(logits.topk(min(5, len(classnames)), dim=-1).indices)
    top = {tau: deal.gather(rows).cpu() for tau, rows in ranked.items()}
    target = torch.tensor(labels)
    if samples is not None:
        samples += per_sample(keys, target, top[temperatures[0]][:, 0])
    return {
        tau: {**classification_metrics(ranked_classes, target), "num_classes": len(classnames)}
        for tau, ranked_classes in top.items()
    }


def per_sample(keys: list[str], target: torch.Tensor, predicted: torch.Tensor) -> list[dict]:
    return [
        {"key": key, "target": int(t), "predicted": int(p), "correct": bool(t == p)}
        for key, t, p in zip(keys, target.tolist(), predicted.tolist())
    ]
