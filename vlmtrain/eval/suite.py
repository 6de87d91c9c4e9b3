"""The evaluations a run asks for (zero-shot classification, retrieval), as one flat metrics dict."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vlmtrain.eval.retrieval import retrieval
from vlmtrain.eval.zeroshot import zeroshot_classification


def run_evals(
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    zeroshot_dir: str | None,
    val_shards: str | None,
    batch_size: int = 256,
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    results: dict[str, float] = {}
    if zeroshot_dir:
        results |= {
            f"zeroshot/{k}": v
            for k, v in zeroshot_classification(model, tokenizer, transform, zeroshot_dir, batch_size).items()
        }
    if val_shards:
        results |= {
            f"retrieval/{k}": v
            for k, v in retrieval(model, tokenizer, transform, val_shards, batch_size).items()
        }
    model.train(was_training)
    return results


def format_results(results: dict[str, float]) -> str:
    width = max((len(k) for k in results), default=0)
    return "\n".join(
        f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
        for k, v in results.items()
    )
