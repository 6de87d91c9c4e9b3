"""How long each command takes to say anything: the time from start to its first byte of output (stdout
or stderr) and the CPU seconds it used by then, median of 5, with the machine's load as they ran, and
`python -X importtime`'s slowest top-level imports for each.

python benchmarks/startup.py [--repeat 5] [--top 4] [--source DIR ...]

Each command is its entry point in a source tree's pyproject.toml, run by this interpreter with the tree
first on PYTHONPATH (default: this checkout). Several trees are timed in turn, run by run, so that they
share the machine's load: e.g. an older commit, `git archive REV vlmtrain configs pyproject.toml | tar -x
-C DIR && mv DIR/configs DIR/vlmtrain/configs`. `vlmtrain-runs` and `vlmtrain-plot` read a sweep of four
small runs; `vlmtrain-train` trains a 3-step run on a synthetic dataset written beforehand.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = [
    "trainer.max_steps=3",
    "trainer.log_every=1",
    "trainer.wandb=false",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.synthetic.train_samples=64",
    "data.synthetic.val_samples=16",
]


def fake_sweep(folder: Path) -> None:
    """Four runs of an `optim.lr` sweep, as vlmtrain-train -m leaves them (without checkpoints)."""
    for job, lr in enumerate(("1e-3", "2e-3", "3e-3", "5e-3")):
        run = folder / str(job)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- optim.lr={lr}\n")
        rows = [{"step": step, "loss": 4.0 / step, "samples_per_s": 100.0} for step in range(10, 210, 10)]
        rows.append({"step": 200, "zeroshot/acc1": 0.5, "zeroshot/acc5": 0.9})
        (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def first_output_s(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Seconds until the command writes its first byte, and the CPU seconds it used by then (which other
    jobs on the machine move much less than the wall time); then it is stopped (the importtime run
    checks that it succeeds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = process.stdout.read(1)
    elapsed = time.perf_counter() - start
    process.kill()
    process.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not first:
        raise SystemExit(f"{' '.join(argv)}: no output")
    return elapsed, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def entry_code(source: Path, command: str) -> str:
    """Python that runs `command` as its console script would, from the tree `source`."""
    target = tomllib.loads((source / "pyproject.toml").read_text())["project"]["scripts"][command]
    module, function = target.split(":")
    return f"import sys; sys.argv[0] = {command!r}; from {module} import {function}; sys.exit({function}())"


def slowest_imports(argv: list[str], cwd: Path, env: dict[str, str], top: int) -> list[tuple[str, float]]:
    """The top-level imports (not those they import) with the largest cumulative time, in seconds."""
    result = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True
    )
    found = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = line.removeprefix("import time:").split("|")
            if not name.startswith("  "):  # indentation marks an import made by another import
                found.append((name.strip(), int(cumulative) / 1e6))
    return sorted(found, key=lambda item: -item[1])[:top]


def commands(work: Path) -> dict[str, list[str]]:
    return {
        "vlmtrain-runs": ["vlmtrain-runs", str(work / "sweep")],
        "vlmtrain-plot": ["vlmtrain-plot", str(work / "sweep"), "--out", str(work / "curves.png")],
        "vlmtrain-train --help": ["vlmtrain-train", "--help"],
        "vlmtrain-eval --help": ["vlmtrain-eval", "--help"],
        "vlmtrain-export --help": ["vlmtrain-export", "--help"],
        "vlmtrain-data --help": ["vlmtrain-data", "--help"],
        "vlmtrain-train (3 steps)": ["vlmtrain-train", f"run_dir={work / 'run'}", *TINY_TRAIN],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--top", type=int, default=4)
    parser.add_argument("--source", type=Path, action="append", help="a source tree (repeatable)")
    parser.add_argument("--only", action="append", help="only the commands whose label has this")
    args = parser.parse_args()
    sources = [path.resolve() for path in args.source or [REPO]]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        fake_sweep(work / "sweep")
        env = os.environ | {"VLMTRAIN_CACHE": str(work / "cache"), "WANDB_MODE": "disabled"}
        env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        envs = [env | {"PYTHONPATH": str(source)} for source in sources]
        warm = [sys.executable, "-c", entry_code(sources[0], "vlmtrain-train"), f"run_dir={work / 'warm'}"]
        subprocess.run([*warm, *TINY_TRAIN], env=envs[0], check=True, capture_output=True)  # writes the data
        print(f"load: {os.getloadavg()[0]:.2f} (1-min average), {os.cpu_count()} cores")
        names = " | ".join(f"{source.name}: first output (s, median of {args.repeat})" for source in sources)
        cpu = " | ".join(f"{source.name}: CPU s" for source in sources)
        print(f"| command | {names} | {cpu} | load | slowest imports (cumulative s) |")
        print(f"|---|{'---|' * 2 * len(sources)}---|---|")
        for label, (command, *rest) in commands(work).items():
            if args.only and not any(wanted in label for wanted in args.only):
                continue
            argvs = [[sys.executable, "-c", entry_code(source, command), *rest] for source in sources]
            times: list[list[tuple[float, float]]] = [[] for _ in sources]
            load = os.getloadavg()[0]  # the 1-minute average as this command's runs start
            for _ in range(args.repeat):
                for argv, source_env, found in zip(argvs, envs, times):
                    subprocess.run(["rm", "-rf", str(work / "run")], check=True)
                    found.append(first_output_s(argv, work, source_env))
            subprocess.run(["rm", "-rf", str(work / "run")], check=True)
            imports = "<br>".join(
                ", ".join(f"{name} {s:.2f}" for name, s in slowest_imports(argv, work, source_env, args.top))
                for argv, source_env in zip(argvs, envs)
            )
            walls = " | ".join(f"{statistics.median(wall for wall, _ in found):.2f}" for found in times)
            cpus = " | ".join(f"{statistics.median(cpu for _, cpu in found):.2f}" for found in times)
            print(f"| `{label}` | {walls} | {cpus} | {load:.1f} | {imports} |", flush=True)


if __name__ == "__main__":
    main()
