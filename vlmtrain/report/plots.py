"""A run's curves as one PNG: the training figures (loss, lr, logit scale and bias, grad norm, data wait,
throughput) and every evaluation metric against step, one panel per metric and one line per run, so the
same figure shows one run (`curves.png` in its directory) or overlays a sweep (`vlmtrain-plot`)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # matplotlib is imported by the functions that draw: vlmtrain-runs reads metrics only
    from matplotlib.figure import Figure

from vlmtrain.atomic import write_atomic

PLOT_FILE = "curves.png"
TRAIN_METRICS = ("loss", "lr", "logit_scale", "logit_bias", "grad_norm", "data_wait", "samples_per_s")
NOT_CURVES = {"step", "time", "epoch", "eta_s", "steps_per_s", "skipped"}
COLUMNS = 4
Curve = tuple[list[int], list[float]]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl's rows; a line cut short by a crash is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def curves(rows: Sequence[dict]) -> dict[str, Curve]:
    """Metric -> (steps, values), in step order; a step logged twice (a resumed run repeats the steps
    after its checkpoint) keeps its last value. Counts (num_samples, num_classes) are not curves."""
    by_metric: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key in NOT_CURVES or key.endswith(("/num_samples", "/num_classes")):
                continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                by_metric.setdefault(key, {})[row["step"]] = float(value)
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in by_metric.items()}


def metric_order(names: set[str]) -> list[str]:
    """Training figures first (in TRAIN_METRICS order), then evaluation metrics by name (recall@5 before @10)."""
    rest = sorted(names - set(TRAIN_METRICS), key=natural_key)
    return [m for m in TRAIN_METRICS if m in names] + rest


def natural_key(text: str) -> list:
    """Numbers inside names compare as numbers: recall@5 before recall@10, run 2 before run 10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def plot_runs(runs: Mapping[str, Sequence[dict]], metrics: Sequence[str] | None = None) -> Figure:
    """One panel per metric (titled by it), one line per run (labelled by its name)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    by_run = {name: curves(rows) for name, rows in runs.items()}
    steps = [step for found in by_run.values() for xs, _ in found.values() for step in xs] or [0]
    first, last = min(steps), max(steps)
    names = metric_order({m for found in by_run.values() for m in found})
    if metrics:
        names = [m for m in names if any(wanted in m for wanted in metrics)]
    columns = min(COLUMNS, max(len(names), 1))
    rows = max(math.ceil(len(names) / columns), 1)
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows))
    FigureCanvasAgg(figure)
    # fixed margins: a layout engine would double the drawing time, paid at every evaluation
    figure.subplots_adjust(
        left=0.06, right=0.98, bottom=0.4 / rows, top=1 - 0.25 / rows, hspace=0.55, wspace=0.3
    )
    for index, metric in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.set_title(metric, fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: never 19.5
        if last > first:  # every panel spans the whole run, so an evaluation sits where it happened
            axes.set_xlim(first - 0.02 * (last - first), last + 0.02 * (last - first))
        for run, found in by_run.items():
            if metric in found:
                steps, values = found[metric]
                axes.plot(steps, values, label=run, marker="." if len(steps) < 20 else None)
        if len(by_run) > 1 and index == 0:
            axes.legend(fontsize=7)
    return figure


def save_png(figure: Figure, path: str | Path) -> Path:
    """Written atomically, so a viewer never opens half a PNG."""
    path = Path(path)
    write_atomic(path, lambda handle: figure.savefig(handle, dpi=90, format="png"))
    return path


def write_run_plot(run_dir: str | Path) -> Path:
    """The run's curves as `<run_dir>/curves.png`."""
    run_dir = Path(run_dir)
    return save_png(plot_runs({run_dir.name: read_metrics(run_dir)}), run_dir / PLOT_FILE)
