"""vlmtrain-runs: the runs under a directory as a table."""

from __future__ import annotations

import argparse

from vlmtrain.cluster.jobs import job_columns
from vlmtrain.commands import fail
from vlmtrain.report.runs import runs_table, to_csv, to_markdown


def runs(argv: list[str] | None = None) -> None:
    """vlmtrain-runs [DIR] [--csv]: the runs under DIR (default ./runs) as a Markdown or CSV table."""
    parser = argparse.ArgumentParser(prog="vlmtrain-runs", description="List the runs under a directory.")
    parser.add_argument("dir", nargs="?", default="runs", help="a folder of runs, or one run (default: runs)")
    parser.add_argument("--csv", action="store_true", help="CSV with every eval metric instead of Markdown")
    args = parser.parse_args(argv)
    table = runs_table(args.dir, parts=[job_columns])  # a submitted run: its job, SLURM state, restarts
    if not table:
        fail(f"{args.dir}: no runs (no folder below holds metrics.jsonl, status.json or checkpoints/)")
    print(to_csv(table) if args.csv else to_markdown(table), end="" if args.csv else "\n")
