"""vlmtrain-plot: the curves of one run or of many (a sweep) in one figure, each line named by the settings
that tell the runs apart."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vlmtrain.commands import fail
from vlmtrain.report.plots import PLOT_FILE, plot_runs, read_metrics, save_png
from vlmtrain.report.runs import differing_settings, find_runs


def plot(argv: list[str] | None = None) -> None:
    """vlmtrain-plot RUN [RUN...] [--out PNG] [--metric NAME...]: the runs' curves in one figure."""
    parser = argparse.ArgumentParser(prog="vlmtrain-plot", description="Overlay the curves of runs.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories, or folders holding runs")
    parser.add_argument(
        "--out", help=f"PNG to write (default: RUN/{PLOT_FILE} for one run, else ./{PLOT_FILE})"
    )
    parser.add_argument(
        "--metric", action="append", help="only metrics whose name contains this (repeatable)"
    )
    args = parser.parse_args(argv)
    runs = [run for given in args.runs for run in find_runs(given)]
    if not runs:
        fail(
            f"{' '.join(args.runs)}: no run directory (none holds metrics.jsonl, status.json or checkpoints/)"
        )
    labels = run_labels(runs)
    figure = plot_runs({labels[run]: read_metrics(run) for run in runs}, args.metric)
    out = args.out or (runs[0] / PLOT_FILE if len(runs) == 1 else Path(PLOT_FILE))
    print(f"wrote {save_png(figure, out)} ({len(runs)} run{'s' * (len(runs) > 1)})")


def run_labels(runs: list[Path]) -> dict[Path, str]:
    """Each run by the settings that differ between the runs, as vlmtrain-runs shows them
    (`optim.lr=1e-3`); runs alike in all of them by their path below the runs' common folder."""
    resolved = [run.resolve() for run in runs]
    common = Path(os.path.commonpath(resolved)) if len(runs) > 1 else resolved[0].parent
    paths = [str(path.relative_to(common)) for path in resolved]
    paths = [path.name if label == "." else label for label, path in zip(paths, resolved)]
    settings = differing_settings(runs) if len(runs) > 1 else [{} for _ in runs]
    labels = [" ".join(f"{key}={value}" for key, value in setting.items()) for setting in settings]
    if not all(labels) or len(set(labels)) < len(labels):
        labels = [f"{path} {label}".rstrip() for path, label in zip(paths, labels)]
    return dict(zip(runs, labels))
