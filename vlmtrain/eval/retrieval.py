"""Image <-> text retrieval recall@k on shards with one or more captions per image (`.txt`, one per line)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from vlmtrain.data.shards import expand_shards
from vlmtrain.data.transforms import decode_captions, decode_image
from vlmtrain.eval.ranks import Deal, Ranks, batched
from vlmtrain.eval.zeroshot import encode_captions, model_device, raw_samples


@torch.no_grad()
def embed_pairs(
    model: torch.nn.Module, tokenizer: Callable, transform: Callable, shards: list[str], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image embeddings, caption embeddings and, for each caption, the index of its image. Under a process
    group every rank embeds its share of the images and captions (a collective: every rank calls it)."""
    ranks, device = Ranks.current(), model_device(model)
    captions: list[str] = []
    owners: list[int] = []

    def read() -> Iterator[list[dict]]:  # every rank reads every caption and which image it belongs to
        for batch in batched(enumerate(raw_samples(shards)), batch_size):
            for index, raw in batch:
                found = decode_captions(raw)
                captions.extend(found)
                owners.extend([index] * len(found))
            yield [raw for _, raw in batch]

    images = Deal(read(), ranks)
    pixels = (torch.stack([transform(decode_image(raw)) for raw in batch]) for batch, _ in images)
    image_embeddings = images.gather([model.encode_image(batch.to(device)) for batch in pixels])
    texts = Deal(batched(captions, batch_size), ranks)
    text_embeddings = texts.gather([encode_captions(model, tokenizer, batch) for batch, _ in texts])
    return image_embeddings, text_embeddings, torch.tensor(owners)


def recall_at_k(
    scores: torch.Tensor, owners: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """`scores` is (captions, images). Text->image: the caption's own image in the top k.
    Image->text: any of the image's captions in the top k."""
    owns = torch.zeros_like(scores, dtype=torch.bool)
    owns[torch.arange(len(owners)), owners] = True
    out = {}
    for k in ks:
        top_images = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[f"image_retrieval_recall@{k}"] = owns.gather(1, top_images).any(1).float().mean().item()
        top_texts = scores.T.topk(min(k, scores.shape[0]), dim=1).indices
        out[f"text_retrieval_recall@{k}"] = owns.T.gather(1, top_texts).any(1).float().mean().item()
    return out


def retrieval(
    model: torch.nn.Module, tokenizer: Callable, transform: Callable, shards: str, batch_size: int = 256
) -> dict[str, float]:
    """Image<->text recall@1/5/10 on `shards`."""
    return retrieval_sweep(model, tokenizer, transform, shards, batch_size=batch_size)[None]


@torch.no_grad()
def retrieval_sweep(
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    shards: str,
    *,
    batch_size: int = 256,
    temperatures: Sequence[float | None] = (None,),
    what: str = "data.val_shards",
) -> dict[float | None, dict[str, float]]:
    """Recall@k for each Llip mixing temperature (None: the model's own); embeddings computed once.
    `what` names the shards in an error."""
    paths = expand_shards(shards, what)
    images, texts, owners = embed_pairs(model, tokenizer, transform, paths, batch_size)
    return {
        tau: recall_at_k(model.similarity(images, texts, temperature=tau).T.cpu(), owners)
        for tau in temperatures
    }
