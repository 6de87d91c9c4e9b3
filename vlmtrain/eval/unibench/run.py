"""Run UniBench's Evaluator on a loaded vlmtrain model: vlmtrain's own classification and relation sets
as UniBench benchmarks, plus UniBench's own benchmarks by name, offline.

Results land in UniBench's feather files (`output_dir/<model name>/<benchmark>.f`, one row per sample,
and `output_dir/aggregate.f`). UniBench skips a (model name, benchmark) pair that `aggregate.f` already
holds, so the default model name carries the checkpoint's name.
"""

from __future__ import annotations

import functools
import keyword
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import unibench.benchmarks_zoo.benchmarks as unibench_benchmarks
from unibench import Evaluator
from unibench.benchmarks_zoo.registry import get_benchmark_info, list_benchmarks

from vlmtrain.checkpoint.load import Pretrained
from vlmtrain.eval.unibench.adapter import RelationHandler, VlmtrainModel, ZeroShotHandler, vlmtrain_handler
from vlmtrain.eval.unibench.sets import ClassificationSet, RelationSet
from vlmtrain.eval.zeroshot import read_task
from vlmtrain.schema import ConfigError, UnibenchConfig

KINDS = {
    "zeroshot": {"benchmark": "zero-shot", "benchmark_type": "object recognition"},
    "relation": {"benchmark": "relation", "benchmark_type": "relation"},
}


def identifier(name: str) -> str:
    """UniBench looks models and benchmarks up with `eval`: names must be Python identifiers."""
    name = re.sub(r"\W", "_", name)
    return f"_{name}" if not name or name[0].isdigit() or keyword.iskeyword(name) else name


def default_model_name(source: Path) -> str:
    """An export folder's name, or a checkpoint's run and file name (runs/a/checkpoints/step_5.pt: a_step_5)."""
    if source.is_dir() or source.parent.name != "checkpoints":
        return identifier(source.stem if source.is_file() else source.name)
    return identifier(f"{source.parent.parent.name}_{source.stem}")


def benchmark_name(prefix: str) -> str:
    """An eval set's prefix (`zeroshot`, `zeroshot/pets`, `relation/aro`) as a UniBench benchmark name."""
    return identifier(prefix.split("/", 1)[1] if "/" in prefix else prefix)


def prepare_output(output_dir: Path) -> None:
    """A fresh output folder needs an aggregate file for UniBench to read (it would download one)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    aggregate = output_dir / "aggregate.f"
    if not aggregate.exists():
        pd.DataFrame({"model_name": [], "benchmark_name": [], "correctness": []}).to_feather(aggregate)


# UniBench's own benchmark functions by name, kept before `add_benchmark` replaces them in its module
STOCK: dict[str, Callable] = {}


def own_benchmark(name: str, transform: Any = None, **kwargs: Any) -> Any:
    """UniBench's benchmark `name` as its own function builds it (with its stock handler)."""
    return STOCK[name](name, transform=transform, **kwargs)


def check_benchmarks(names: list[str]) -> None:
    unknown = [name for name in names if name not in STOCK and name not in list_benchmarks()]
    if unknown:
        raise ConfigError(
            f"unibench.benchmarks: {unknown} are not UniBench benchmarks (`unibench list_benchmarks` lists them)"
        )


def add_own_benchmark(evaluator: Evaluator, name: str) -> None:
    check_benchmarks([name])
    STOCK.setdefault(name, getattr(unibench_benchmarks, name))
    evaluator.add_benchmark(
        functools.partial(own_benchmark, name),
        functools.partial(vlmtrain_handler, benchmark_name=name),
        meta_data=dict(get_benchmark_info(name)),
    )


def add_vlmtrain_set(evaluator: Evaluator, name: str, kind: str, location: str) -> None:
    if kind == "zeroshot":
        classes, templates = read_task(location)
        handler = functools.partial(
            ZeroShotHandler, benchmark_name=name, classes=classes, templates=templates
        )
        dataset = functools.partial(ClassificationSet, location)
    else:
        handler = functools.partial(RelationHandler, benchmark_name=name)
        dataset = functools.partial(RelationSet, location)
    evaluator.add_benchmark(dataset, handler, meta_data={**KINDS[kind], "location": location})


def run_unibench(
    loaded: Pretrained,
    config: UnibenchConfig,
    sets: dict[str, str],
    output_dir: Path,
    batch_size: int,
    device: str,
) -> dict[str, float]:
    """Evaluate `loaded` on `sets` (eval prefix -> location, e.g. `relation/aro` -> shards) and
    `config.benchmarks`; returns `unibench/<benchmark>/acc` and `/num_samples` from the feather files."""
    name = identifier(config.model_name) if config.model_name else default_model_name(loaded.source)
    names = {benchmark_name(prefix): prefix for prefix in sets}
    if len(names) < len(sets):
        raise ConfigError(f"unibench: the eval sets {sorted(sets)} would share UniBench benchmark names")
    if clash := sorted(set(names) & set(config.benchmarks)):
        raise ConfigError(f"unibench.benchmarks: {clash} also name eval sets; rename the sets")
    prepare_output(output_dir)
    evaluator = Evaluator(
        num_workers=config.num_workers,
        models=[name],
        benchmarks=[*config.benchmarks, *names],
        output_dir=str(output_dir),
        benchmarks_dir=str(Path(config.benchmarks_dir).expanduser()),
        download_aggregate_precomputed=False,
    )
    model = functools.partial(
        VlmtrainModel,
        model=loaded.model,
        model_name=name,
        transform=loaded.transform,
        tokenizer=loaded.tokenizer,
    )
    evaluator.add_model(model, meta_data={"model_name": name, "source": str(loaded.source)})
    for benchmark in config.benchmarks:
        add_own_benchmark(evaluator, benchmark)
    for benchmark, prefix in names.items():
        add_vlmtrain_set(evaluator, benchmark, prefix.split("/", 1)[0], sets[prefix])
    evaluator.update_model_list([name])
    evaluator.update_benchmark_list([*config.benchmarks, *names])
    evaluator.evaluate(device="cuda" if device.startswith("cuda") else "cpu", batch_per_gpu=batch_size)
    return read_results(output_dir, name, [*config.benchmarks, *names])


def read_results(output_dir: Path, model_name: str, benchmarks: list[str]) -> dict[str, float]:
    results: dict[str, float] = {}
    for benchmark in benchmarks:
        rows = pd.read_feather(output_dir / model_name / f"{benchmark}.f")
        results[f"unibench/{benchmark}/acc"] = float(rows["correctness"].mean())
        results[f"unibench/{benchmark}/num_samples"] = len(rows)
    return results


def results_table(results: dict[str, float]) -> str:
    """UniBench's results as one Markdown table: a row per benchmark."""
    lines = ["| benchmark | samples | accuracy |", "|---|---|---|"]
    for key, value in results.items():
        if key.endswith("/acc"):
            benchmark = key.removeprefix("unibench/").removesuffix("/acc")
            count = results[f"unibench/{benchmark}/num_samples"]
            lines.append(f"| {benchmark} | {count} | {value:.4f} |")
    return "\n".join(lines)
