"""A vlmtrain model in UniBench's model interface, and UniBench handlers that score with the model.

UniBench's own handlers score `image_embedding @ text_embedding`; a Llip image has no caption-free
embedding (its mixture tokens are mixed per caption), so these handlers ask the model for its scores:
`similarity(encode_image(images), encode_text(texts))`, the scores vlmtrain-eval uses. For CLIP and SigLIP
that is the plain cosine UniBench computes. Scoring runs in fp32 (UniBench wraps batches in CUDA
autocast) so that a sample's prediction equals vlmtrain-eval's.

UniBench's handlers squeeze a batch of one image down to no batch dimension and then fail; these
handlers evaluate such a batch as two copies of the image and keep the first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from unibench.benchmarks_zoo.wrappers.bechmark_handler import (
    RelationBenchmarkHandler,
    ZeroShotBenchmarkHandler,
)
from unibench.models_zoo.wrappers.base import AbstractModel

from vlmtrain.eval.zeroshot import encode_captions, text_classifier


def fp32() -> torch.autocast:
    return torch.autocast("cuda", enabled=False)


class VlmtrainModel(AbstractModel):
    """Any model `load_pretrained` loads, with its own eval transform and tokenizer."""

    def __init__(
        self, model: torch.nn.Module, model_name: str, transform: Callable, tokenizer: Callable, **kwargs: Any
    ) -> None:
        super().__init__(model, model_name, tokenizer=tokenizer, **kwargs)
        self.transform = transform

    def get_preprocess_transforms(self) -> Callable:
        return self.transform

    @torch.no_grad()
    def get_image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        with fp32():
            return self.model.encode_image(images.to(self.device).float())

    @torch.no_grad()
    def get_text_embeddings(self, texts: list[str]) -> torch.Tensor:
        with fp32():
            return encode_captions(self.model, self.tokenizer, list(texts))

    @torch.no_grad()
    def compute_zeroshot_weights(self) -> None:
        """One classifier row per class, averaged over the prompts as vlmtrain-eval does. Templates take the
        class name as `{c}` (vlmtrain, CLIP_benchmark) or `{}` (UniBench's own benchmarks)."""
        templates = [t.replace("{}", "{c}") for t in self.templates]
        with fp32():
            self.zeroshot_weights = text_classifier(self.model, self.tokenizer, self.classes, templates)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """(images, texts): each image scored with each text, the image mixed per text for Llip."""
        with fp32():
            return self.model.similarity(self.get_image_embeddings(images), text_embeddings).float()


def batch_size(batch: list | tuple) -> int:
    ids = batch[2] if len(batch) > 2 else batch[1]  # sample keys, else labels
    return len(ids)


def doubled(value: Any) -> Any:
    """A batch of one as a batch of two copies (images, labels, keys, per-option caption lists)."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value])
    if isinstance(value, list | tuple):
        if all(isinstance(item, str) for item in value):
            return [*value, *value]
        return type(value)(doubled(item) for item in value)
    return value


def first_row(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 2:
        return value[:1]
    if isinstance(value, list) and len(value) == 2:
        return value[:1]
    return value


def as_rows(result: dict, rows: int) -> dict:
    """Tensors as lists of one entry per sample: UniBench's output handler squeezes a tensor, which turns
    a batch of one into a scalar (or a single row of top-5 classes into five rows)."""
    out = {}
    for key, value in result.items():
        if isinstance(value, torch.Tensor) and value.numel() % rows == 0:
            value = value.detach().cpu().reshape(rows, -1)
            value = (value[:, 0] if value.shape[1] == 1 else value).tolist()
        out[key] = value
    return out


class PerSampleRows:
    """Every batch, a batch of one included, gives one output row per sample."""

    def eval_batch(self, model: VlmtrainModel, batch: list) -> dict:
        rows = batch_size(batch)
        if rows == 1:
            result = {k: first_row(v) for k, v in super().eval_batch(model, doubled(batch)).items()}
        else:
            result = super().eval_batch(model, batch)
        return as_rows(result, rows)


class ZeroShotHandler(PerSampleRows, ZeroShotBenchmarkHandler):
    """Image-class scores from the model (Llip: the image mixed for each class's prompts)."""

    def get_zeroshot_predictions(self, model: VlmtrainModel, images: torch.Tensor) -> torch.Tensor:
        scale = model.model.logit_scale.detach().exp().clamp(max=100).float()
        return scale * model.scores(images, model.zeroshot_weights)


class RelationHandler(PerSampleRows, RelationBenchmarkHandler):
    """Each image scored with its own captions only (Llip: mixed for each caption)."""

    def get_similarity(self, model: VlmtrainModel, images: torch.Tensor, captions: list) -> torch.Tensor:
        """(N, 1, L): image n with caption l of its own; `captions[l][n]` (UniBench's layout)."""
        columns = [
            model.scores(images, model.get_text_embeddings(list(option))).diagonal() for option in captions
        ]
        return torch.stack(columns, dim=1).unsqueeze(1)


def vlmtrain_handler(benchmark_name: str, benchmark: Any) -> Any:
    """UniBench's handler for one of its own benchmarks, turned into the model-scoring one of its kind
    (`benchmark` is the handler UniBench's benchmark function built); other kinds are kept as they are."""
    if isinstance(benchmark, ZeroShotBenchmarkHandler):
        return ZeroShotHandler(
            benchmark_name, benchmark.benchmark, benchmark.classes, benchmark.templates, benchmark.topx
        )
    if isinstance(benchmark, RelationBenchmarkHandler):
        return RelationHandler(benchmark_name, benchmark.benchmark)
    return benchmark
