"""Relation sets (ARO / SugarCrepe / Winoground style): pick an image's true caption among wrong ones.

Shards (a folder of .tar, a pattern or a list joined by '::') whose samples carry an image and a `.json`
`{"caption": "the true caption", "negatives": ["a wrong caption", ...]}`; every sample of a set has the
same number of negatives. A sample is correct when its true caption scores highest (a tie counts for the
true caption, as the first among equals). Llip scores each (image, caption) pair with the image mixed for
that caption, so the pairs are scored one caption per image, never through a shared image embedding.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence

import torch

from vlmtrain.data.shards import expand_shards, read_shard
from vlmtrain.data.transforms import decode_image
from vlmtrain.eval.ranks import Deal, Ranks, batched
from vlmtrain.eval.zeroshot import encode_captions, model_device


def read_options(raw: dict, shard: str) -> list[str]:
    """[true caption, *negatives] of one raw sample; one line naming the shard and key if malformed."""
    where = f"relation sample {raw.get('__key__')} in {shard}"
    if "json" not in raw:
        raise ValueError(f"{where}: no .json with 'caption' and 'negatives'")
    spec = json.loads(raw["json"])
    if not isinstance(spec.get("caption"), str) or not spec.get("negatives"):
        raise ValueError(f"{where}: .json needs a 'caption' string and a non-empty 'negatives' list")
    return [spec["caption"], *map(str, spec["negatives"])]


def relation_samples(shards: list[str]) -> Iterator[tuple[str, dict, list[str]]]:
    """(key, raw sample, [true caption, *negatives]) in shard order; all with the same number of options."""
    count = None
    for shard in shards:
        for raw in read_shard(shard, on_error=lambda exc: False):
            options = read_options(raw, shard)
            if count is not None and len(options) != count:
                raise ValueError(
                    f"relation sample {raw['__key__']} in {shard}: {len(options) - 1} negatives, "
                    f"the set's first sample has {count - 1}"
                )
            count = len(options)
            yield raw["__key__"], raw, options


@torch.no_grad()
def pair_scores(
    model: torch.nn.Module,
    tokenizer: Callable,
    images: torch.Tensor,
    options: list[list[str]],
    temperatures: Sequence[float | None] = (None,),
) -> dict[float | None, torch.Tensor]:
    """(N, L) score of image n with its own option l, for each temperature; `options[l][n]` is image n's
    l-th caption (the true one at l=0)."""
    device = model_device(model)
    embedded = model.encode_image(images.to(device))
    texts = [encode_captions(model, tokenizer, captions) for captions in options]
    return {
        tau: torch.stack(
            [model.similarity(embedded, text, temperature=tau).diagonal() for text in texts], dim=1
        )
        for tau in temperatures
    }


@torch.no_grad()
def relation_sweep(
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    shards: str,
    *,
    batch_size: int = 256,
    temperatures: Sequence[float | None] = (None,),
    what: str = "relation shards",
    samples: list[dict] | None = None,
) -> dict[float | None, dict[str, float]]:
    """Accuracy (true caption ranked first) for each Llip temperature; `samples` receives one record per
    image (key, predicted option, correct) for the first temperature. Under a process group every rank
    scores its share of the images (a collective: every rank calls it)."""
    keys: list[str] = []

    def read() -> Iterator[list[tuple[str, dict, list[str]]]]:  # every rank reads every key
        for batch in batched(relation_samples(expand_shards(shards, what)), batch_size):
            keys.extend(key for key, _, _ in batch)
            yield batch

    deal = Deal(read(), Ranks.current())
    chosen = []  # (B, temperatures): the option each image picks
    for batch, _ in deal:
        images = torch.stack([transform(decode_image(raw)) for _, raw, _ in batch])
        options = [list(column) for column in zip(*(opts for _, _, opts in batch))]
        scores = pair_scores(model, tokenizer, images, options, temperatures)
        chosen.append(torch.stack([s.argmax(dim=1) for s in scores.values()], dim=1))  # a tie: the truth
    picks = deal.gather(chosen).cpu()
    if not keys:
        raise ValueError(f"{what}: no samples in {shards}")
    if samples is not None:
        predicted = picks[:, 0].tolist()
        samples += [{"key": k, "predicted": p, "correct": p == 0} for k, p in zip(keys, predicted)]
    return {
        tau: {"acc": (picks[:, i] == 0).float().mean().item(), "num_samples": len(keys)}
        for i, tau in enumerate(temperatures)
    }
