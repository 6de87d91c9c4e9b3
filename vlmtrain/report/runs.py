"""The runs under a directory as a table: one row per run (a dict, so other parts can add columns: a job
scheduler its job id and restarts), compared by the config values that differ between them.

A run is a directory holding any of status.json, metrics.jsonl or checkpoints/; its state comes from
status.json (the Trainer keeps it), or, for a run without one, from its eval.json and checkpoints."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from vlmtrain.dotted import flatten
from vlmtrain.eval.keys import HEADLINE, parse_key
from vlmtrain.report.plots import natural_key, read_metrics
from vlmtrain.train.status import read_status

RUN_MARKERS = ("status.json", "metrics.jsonl", "checkpoints")
NOT_RUNS = {"checkpoints", ".hydra", "wandb", "eval"}
SAME_FOR_ALL = {"name", "run_dir"}  # differ by construction
HEAD = ("name", "state", "step", "loss", "samples_per_s", "eta")
RowPart = Callable[[Path], dict[str, Any]]


def find_runs(root: str | Path) -> list[Path]:
    """`root` itself if it is a run, else the runs below it (a sweep's numbered folders included)."""
    root = Path(root)
    if any((root / marker).exists() for marker in RUN_MARKERS):
        return [root]
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir(), key=lambda p: natural_key(p.name)):  # 2 before 10
        if child.is_dir() and child.name not in NOT_RUNS and not child.name.startswith("."):
            found += find_runs(child)
    return found


def run_state(run_dir: Path, last_step: int) -> dict[str, Any]:
    """state (running | finished | stopped at step N | failed), step, max_steps and the error line."""
    status = read_status(run_dir)
    if status is None:
        return _state_without_status(run_dir, last_step)
    step, state = max(status.get("step", 0), last_step), status["state"]
    out = {"step": step, "max_steps": status.get("max_steps")}
    if state == "running" and _process_gone(status):
        return out | {"state": "failed", "error": "the process ended without a word (killed?)"}
    if state == "stopped":
        return out | {"state": f"stopped at step {status['step']}"}
    return out | {"state": state, **({"error": status["error"]} if status.get("error") else {})}


def _process_gone(status: dict) -> bool:
    """Only on the host that wrote it can a reader tell; elsewhere a running run is taken at its word."""
    if status.get("host") != socket.gethostname() or not status.get("pid"):
        return False
    try:
        os.kill(status["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _state_without_status(run_dir: Path, last_step: int) -> dict[str, Any]:
    if (run_dir / "eval.json").is_file():
        step = json.loads((run_dir / "eval.json").read_text()).get("step", last_step)
        return {"state": "finished", "step": step, "max_steps": step}
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    saved = int(checkpoints[-1].stem.removeprefix("step_")) if checkpoints else 0
    return {"state": f"stopped at step {saved}", "step": max(saved, last_step), "max_steps": None}


def run_overrides(run_dir: Path) -> dict[str, str] | None:
    """The command line's overrides (Hydra's .hydra/overrides.yaml, a sweep job's own point included) as
    key -> value; None for a run not started by vlmtrain-train."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    items = _parsed(path, yaml.safe_load) or []
    if not isinstance(items, list):
        raise ValueError(f"{path.name}: not a list of overrides")
    pairs = (str(item).lstrip("+~").partition("=") for item in items)
    return {key: as_typed(value) for key, _, value in pairs}


def as_typed(value: str) -> str:
    """An override's value as it was typed: Hydra writes a sweep's points with Python's `True`, `False`
    and `None` (`trainer.wandb=false -m` records `False`), which would differ from a single run's."""
    return {"True": "true", "False": "false", "None": "null"}.get(value, value)


def run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config (config.json, written by the Trainer) as dotted keys."""
    path = run_dir / "config.json"
    return settings(_parsed(path, json.loads)) if path.is_file() else {}


def _parsed(path: Path, parse: Callable[[str], Any]) -> Any:
    """A file's parsed text (safe loaders only: data, never objects); one line naming the file if bad."""
    try:
        return parse(path.read_text())
    except (ValueError, yaml.YAMLError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{path.name}: {reason}") from None


def settings(tree: Any) -> dict[str, Any]:
    """A config tree as flat dotted keys, each value a table cell (lists as JSON)."""
    return {
        key: value if isinstance(value, int | float | str | bool | None) else json.dumps(value)
        for key, value in flatten(tree, keep_empty=False).items()
    }


def run_row(run_dir: Path, root: Path | None = None) -> dict[str, Any]:
    """One run's row: name, state, step, max_steps, loss, samples_per_s and its latest value of every eval
    metric."""
    rows = read_metrics(run_dir)
    last: dict[str, Any] = {}
    for row in rows:
        last |= {k: v for k, v in row.items() if k in ("loss", "samples_per_s", "eta_s") or parse_key(k)}
    if (run_dir / "eval.json").is_file():
        last |= {k: v for k, v in json.loads((run_dir / "eval.json").read_text()).items() if parse_key(k)}
    name = str(run_dir.relative_to(root)) if root and run_dir != root else run_dir.name
    state = run_state(run_dir, max((row.get("step", 0) for row in rows), default=0))
    error = {"error": state.pop("error")} if "error" in state else {}
    head = {"name": name, "state": state["state"], "step": state["step"], "max_steps": state["max_steps"]}
    eta_s = last.pop("eta_s", None)
    eta = _hms(eta_s) if state["state"] == "running" else None
    figures = {"loss": last.pop("loss", None), "samples_per_s": last.pop("samples_per_s", None), "eta": eta}
    return {**head, **figures, **last, **error}


def _hms(seconds: float | None) -> str | None:
    """A running run's time left as h:mm:ss (None for a run that is not running)."""
    if seconds is None:
        return None
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def damaged_row(run_dir: Path, root: Path | None, error: Exception) -> dict[str, Any]:
    """A run whose files cannot be read (a bad overrides.yaml, a truncated config.json): still a row."""
    name = str(run_dir.relative_to(root)) if root and run_dir != root else run_dir.name
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return {"name": name, "state": "damaged", "step": None, "max_steps": None, "error": reason[:120]}


def _row(run_dir: Path, root: Path, parts: Sequence[RowPart]) -> dict[str, Any]:
    try:
        run_overrides(run_dir), run_config(run_dir)  # read here: a damaged file is a row, not a lost table
        row = run_row(run_dir, root)
        for part in parts:
            row |= part(run_dir)
        return row
    except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError) as error:
        return damaged_row(run_dir, root, error)


def runs_table(root: str | Path, parts: Sequence[RowPart] = ()) -> list[dict[str, Any]]:
    """A row per run under `root`; each of `parts` adds its columns to every row. The config values
    that differ between the runs become columns named by their key. A run whose files cannot be read is
    a row saying so (`damaged`, with the first line of the reason)."""
    root = Path(root)
    rows = [(run_dir, _row(run_dir, root, parts)) for run_dir in find_runs(root)]
    readable = [(run_dir, row) for run_dir, row in rows if row["state"] != "damaged"]
    for (_, row), setting in zip(readable, differing_settings([run_dir for run_dir, _ in readable])):
        # `loss=llip` must not hide the loss column
        row |= {(f"{key} (config)" if key in row else key): value for key, value in setting.items()}
    return [row for _, row in rows]


def differing_settings(run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Each run's config values that are not the same in every run, by key. The overrides say it in the
    user's words; runs started otherwise are compared by their config."""
    overrides = [run_overrides(run_dir) for run_dir in run_dirs]
    from_overrides = all(found is not None for found in overrides)
    settings = overrides if from_overrides else [run_config(run_dir) for run_dir in run_dirs]
    differing = differing_keys(settings, shared_only=not from_overrides)
    return [{key: setting.get(key, "") for key in differing} for setting in settings]


def differing_keys(settings: Sequence[dict[str, Any]], shared_only: bool = False) -> list[str]:
    """Keys whose value is not the same in every run. `shared_only`: of a full config, only keys every
    run has (or `_target_`s): a different component's own fields follow from its `_target_`."""
    keys = {key for setting in settings for key in setting} - SAME_FOR_ALL
    if shared_only:
        keys = {k for k in keys if k.endswith("_target_") or all(k in setting for setting in settings)}
    missing = object()
    return [
        key
        for key in sorted(keys)
        if len({json.dumps(setting.get(key, missing), default=str) for setting in settings}) > 1
    ]


def _columns(table: Iterable[dict[str, Any]], headline_only: bool) -> list[str]:
    """The run's figures, then eval metrics (headline ones only, or all), then the rest (error, added
    parts, differing config values) in the order first seen."""
    seen: list[str] = []
    for row in table:
        seen += [key for key in row if key not in seen and key != "max_steps"]
    metrics = [key for key in seen if parse_key(key)]
    if headline_only:
        metrics = [k for k in metrics if parse_key(k).temperature is None and parse_key(k).metric in HEADLINE]
    head = [key for key in HEAD if key in seen]
    return head + metrics + [key for key in seen if key not in HEAD and not parse_key(key)]


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key, "")
    if key == "step" and row.get("max_steps"):
        return f"{value}/{row['max_steps']}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def to_markdown(table: Sequence[dict[str, Any]]) -> str:
    """Headline eval metrics only (acc1, acc5, recall@1); `to_csv` holds them all."""
    columns = _columns(table, headline_only=True)
    lines = [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}"]
    lines += [f"| {' | '.join(_cell(row, c).replace('|', '/') for c in columns)} |" for row in table]
    return "\n".join(lines)


def to_csv(table: Sequence[dict[str, Any]]) -> str:
    columns = _columns(table, headline_only=False) + ["max_steps"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()
