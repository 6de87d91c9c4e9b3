"""The evaluations a run asks for (zero-shot classification, retrieval), as one flat metrics dict."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vlmtrain.eval.retrieval import retrieval_sweep
from vlmtrain.eval.zeroshot import zeroshot_sweep
from vlmtrain.models.llip_model import LlipModel


def run_evals(
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    zeroshot_dir: str | None,
    val_shards: str | None,
    batch_size: int = 256,
    llip_temperatures: Sequence[float] | None = None,
) -> dict[str, float]:
    """`zeroshot/<metric>` and `retrieval/<metric>`; for a Llip model with `llip_temperatures`, also
    `zeroshot/tau=<t>/<metric>` and `retrieval/tau=<t>/<metric>` for each mixing temperature."""
    sweep = tuple(llip_temperatures or ()) if isinstance(model, LlipModel) else ()
    temperatures = (None, *sweep)
    was_training = model.training
    model.eval()
    results: dict[str, float] = {}
    if zeroshot_dir:
        found = zeroshot_sweep(model, tokenizer, transform, zeroshot_dir, batch_size, temperatures)
        results |= flatten("zeroshot", found)
    if val_shards:
        results |= flatten(
            "retrieval", retrieval_sweep(model, tokenizer, transform, val_shards, batch_size, temperatures)
        )
    model.train(was_training)
    return results


def flatten(task: str, by_temperature: dict[float | None, dict[str, float]]) -> dict[str, float]:
    return {
        f"{task}/{k}" if tau is None else f"{task}/tau={tau:g}/{k}": v
        for tau, metrics in by_temperature.items()
        for k, v in metrics.items()
    }


def benchmark_records(results: dict[str, float], model: str, datasets: dict[str, str | None]) -> list[dict]:
    """The flat results as CLIP_benchmark-style records: one per task (and Llip temperature)."""
    tasks = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}
    records: dict[tuple[str, str], dict] = {}
    for key, value in results.items():
        task, *tau, metric = key.split("/")
        temperature = float(tau[0].removeprefix("tau=")) if tau else None
        record = records.setdefault(
            (task, str(temperature)),
            {"dataset": datasets.get(task), "model": model, "task": tasks[task], "metrics": {}},
        )
        if temperature is not None:
            record["llip_temperature"] = temperature
        record["metrics"][metric] = value
    return list(records.values())


def format_results(results: dict[str, float]) -> str:
    width = max((len(k) for k in results), default=0)
    return "\n".join(
        f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
        for k, v in results.items()
    )
