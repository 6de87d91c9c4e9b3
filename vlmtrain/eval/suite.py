"""The evaluations a run asks for (zero-shot classification and retrieval sets, each under its name), as
one flat metrics dict keyed `<task>[/<set>][/tau=<t>]/<metric>`, and the tables that show it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.distributed.fsdp import FSDPModule

from vlmtrain.eval.keys import HEADLINE, TASKS, parse_key
from vlmtrain.eval.relation import relation_sweep
from vlmtrain.eval.retrieval import retrieval_sweep
from vlmtrain.eval.zeroshot import zeroshot_sweep
from vlmtrain.models.llip_model import LlipModel

COUNTS = ("num_samples", "num_classes")


def eval_sets(
    default: str | None, named: Mapping[str, str] | None = None, task: str = "zeroshot"
) -> dict[str, str]:
    """Set prefix -> location: the unnamed default (`zeroshot_dir`/`val_shards`) as `<task>`, each named
    set as `<task>/<name>`."""
    sets = {task: default} if default else {}
    return sets | {f"{task}/{name}": where for name, where in (named or {}).items()}


def run_evals(
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    zeroshot: Mapping[str, str],
    retrieval: Mapping[str, str],
    *,
    batch_size: int = 256,
    llip_temperatures: Sequence[float] | None = None,
    relation: Mapping[str, str] | None = None,
    samples: dict[str, list[dict]] | None = None,
) -> dict[str, float]:
    """Every set of `eval_sets` (prefix -> location): `<prefix>/<metric>`; for a Llip model with
    `llip_temperatures`, also `<prefix>/tau=<t>/<metric>` for each mixing temperature. `samples`, if
    given, receives each classification and relation set's per-sample records under its prefix.

    Under a process group every rank evaluates its share of each set and gets every result (a collective:
    every rank calls it, with the same sets); a sharded model's own weights are gathered meanwhile."""
    sweep = tuple(llip_temperatures or ()) if isinstance(model, LlipModel) else ()
    temperatures = (None, *sweep)
    was_training = model.training
    model.eval()
    try:
        with _whole(model):
            return _every_set(
                model,
                tokenizer,
                transform,
                sets={"zeroshot": zeroshot, "retrieval": retrieval, "relation": relation or {}},
                batch_size=batch_size,
                temperatures=temperatures,
                samples=samples,
            )
    finally:
        model.train(was_training)


def _whole(model: torch.nn.Module) -> AbstractContextManager:
    """A sharded model's own weights gathered on every rank for the methods other than forward that
    evaluation calls (`sharding.gathered`); nothing for a plain model."""
    if not isinstance(model, FSDPModule):
        return nullcontext()
    from vlmtrain.distributed.sharding import gathered  # its checkpoint imports cost seconds

    return gathered(model)


def _every_set(
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    *,
    sets: Mapping[str, Mapping[str, str]],
    batch_size: int,
    temperatures: tuple[float | None, ...],
    samples: dict[str, list[dict]] | None,
) -> dict[str, float]:
    results: dict[str, float] = {}

    def records(prefix: str) -> list[dict] | None:
        return None if samples is None else samples.setdefault(prefix, [])

    common = {"batch_size": batch_size, "temperatures": temperatures}
    for prefix, root in sets["zeroshot"].items():
        found = zeroshot_sweep(model, tokenizer, transform, root, **common, samples=records(prefix))
        results |= flatten(prefix, found)
    for prefix, shards in sets["retrieval"].items():
        what = "data.val_shards" if prefix == "retrieval" else f"data.{prefix.replace('/', '.')}"
        results |= flatten(prefix, retrieval_sweep(model, tokenizer, transform, shards, **common, what=what))
    for prefix, shards in sets["relation"].items():
        what = f"relation.{prefix.removeprefix('relation/')}"
        found = relation_sweep(
            model, tokenizer, transform, shards, **common, what=what, samples=records(prefix)
        )
        results |= flatten(prefix, found)
    return results


def flatten(prefix: str, by_temperature: dict[float | None, dict[str, float]]) -> dict[str, float]:
    return {
        f"{prefix}/{k}" if tau is None else f"{prefix}/tau={tau:g}/{k}": v
        for tau, metrics in by_temperature.items()
        for k, v in metrics.items()
    }


def benchmark_records(
    results: dict[str, float], model: str, datasets: Mapping[str, str | None]
) -> list[dict]:
    """The flat results as CLIP_benchmark-style records: one per set (and Llip temperature). `datasets`
    maps a set prefix (`zeroshot`, `retrieval/coco`) to its location."""
    records: dict[tuple[str, str], dict] = {}
    for key, value in results.items():
        if (parsed := parse_key(key)) is None:
            continue
        record = records.setdefault(
            (parsed.prefix, str(parsed.temperature)),
            {
                "dataset": datasets.get(parsed.prefix),
                "model": model,
                "task": TASKS[parsed.task],
                "metrics": {},
            },
        )
        if parsed.name:
            record["name"] = parsed.name
        if parsed.temperature is not None:
            record["llip_temperature"] = parsed.temperature
        record["metrics"][parsed.metric] = value
    return list(records.values())


def format_results(results: dict[str, float]) -> str:
    width = max((len(k) for k in results), default=0)
    return "\n".join(
        f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
        for k, v in results.items()
    )


def temperature_table(results: dict[str, float]) -> str:
    """A Llip sweep as one table: a row per eval set and headline metric, a column per tau ('model' is
    the model's own). Empty when the results hold no sweep."""
    rows: dict[str, dict[str, float]] = {}
    columns: list[float] = []
    for key, value in results.items():
        parsed = parse_key(key)
        if parsed is None or parsed.metric not in HEADLINE:
            continue
        rows.setdefault(f"{parsed.prefix} {parsed.metric}", {})[str(parsed.temperature)] = value
        if parsed.temperature is not None and parsed.temperature not in columns:
            columns.append(parsed.temperature)
    if not columns:
        return ""
    names = ["None", *map(str, sorted(columns))]
    header = ["set metric", "model", *(f"tau={t:g}" for t in sorted(columns))]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    for row, cells in rows.items():
        values = [f"{cells[n]:.4f}" if n in cells else "" for n in names]
        lines.append(f"| {row} | {' | '.join(values)} |")
    return "\n".join(lines)


def format_report(results: dict[str, float]) -> str:
    """The model's own results line by line, then a Llip sweep (if any) as one table."""
    own = {k: v for k, v in results.items() if (key := parse_key(k)) is None or key.temperature is None}
    table = temperature_table(results)
    return format_results(own) + (f"\n{table}" if table else "")
