"""UniBench evaluation of any vlmtrain model (the optional `unibench` extra, imported only when used).

UniBench is CC-BY-NC 4.0 code that vlmtrain calls, never copies: vlmtrain's own sets become UniBench
benchmarks (`sets`), the model and Llip-aware handlers are in `adapter`, the Evaluator run in `run`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from vlmtrain.extras import require

WHAT = "unibench.enabled=true"
# Noise from UniBench's own choices on a CPU (pinned memory, CUDA autocast) and its openai-clip import
QUIET = ("pkg_resources is deprecated", ".*'pin_memory' argument", "CUDA is not available")


def check_unibench(benchmarks: list[str]) -> None:
    """Before any evaluation: the extra is installed (one line naming it if not) and each of UniBench's
    own benchmarks named exists."""
    with warnings.catch_warnings():
        for message in QUIET:
            warnings.filterwarnings("ignore", message=message)
        require("pkg_resources", "unibench", WHAT, package="setuptools<81")  # openai-clip imports it
        require("unibench", "unibench", WHAT)
        from vlmtrain.eval.unibench.run import check_benchmarks

    check_benchmarks(benchmarks)


def unibench_report(
    loaded: Any, cfg: Any, sets: dict[str, str], out: Path, device: str
) -> tuple[dict[str, float], str]:
    """UniBench's results for an eval config (`cfg.unibench`) on `sets` (eval prefix -> location), and
    their table. The feather files go to `cfg.unibench.output_dir` (default: <out folder>/unibench)."""
    check_unibench(list(cfg.unibench.benchmarks))
    from vlmtrain.eval.unibench.run import results_table, run_unibench

    config = cfg.unibench
    output_dir = Path(config.output_dir).expanduser() if config.output_dir else out.parent / "unibench"
    with warnings.catch_warnings():
        for message in QUIET:
            warnings.filterwarnings("ignore", message=message)
        results = run_unibench(loaded, config, sets, output_dir, cfg.batch_size, device)
    return results, f"{results_table(results)}\nfeather files in {output_dir}"
