"""Training throughput: vlmtrain vs open_clip's own trainer (open_clip_train) on the same work.

Both sides train the same open_clip towers (read from vlmtrain's resolved Hydra config) on the
same synthetic shards, with the same global batch size, precision, AdamW settings, warmup-cosine
schedule, gradient clipping, step count and number of data workers: one local process each, no
evaluation, checkpoints only after the last step. Runs alternate (vlmtrain, open_clip, vlmtrain,
...) so both see similar machine load. A run's rate is samples/s over its steps after the first
`--skip` (data-loader start, shuffle-buffer fill, allocator warmup), taken from each trainer's own
log: vlmtrain's metrics.jsonl and open_clip_train's out.log. On CUDA (or with `--peak-tflops`) the
tables add MFU: samples/s times the model's training FLOPs per pair (vlmtrain.report.flops, counted on
the meta device at the full context; the same model on both sides, so the two MFUs compare as their
samples/s do) over the GPU's dense peak for the precision.

    bash benchmarks/openclip_env.sh          # once: open_clip_train's own venv in .venv-openclip
    .venv/bin/python benchmarks/throughput.py [--steps 24 --skip 4 --repeats 3 ...]

open_clip_train is started through benchmarks/openclip_side.py, under its own venv; it picks one
caption line per sample, as vlmtrain does.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from openclip_side import openclip_model_cfg, openclip_train_args  # this directory is on sys.path
from tower_options import train_flops

REPO = Path(__file__).resolve().parent.parent
SAMPLES_PER_SHARD = 1000  # what vlmtrain-data synthetic writes
OPENCLIP_LOG_LINE = re.compile(
    r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?\] Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)"
)


@dataclass
class Window:
    """A stretch of consecutive training steps, as a trainer logged it."""

    end_step: int  # steps done at its end
    steps: int
    seconds: float
    data_seconds: float | None = None  # time waiting for the loader, where the trainer reports it


@dataclass
class Rate:
    samples_per_s: float  # all timed samples over all timed seconds
    typical_samples_per_s: float  # batch size over the median logged step time: robust to load spikes
    timed_steps: int
    data_wait: float | None  # fraction of the timed seconds spent waiting for data, where reported


@dataclass
class RunResult:
    trainer: str
    repeat: int
    rate: Rate
    load: float  # the machine's 1-minute load average as the run ended
    wall_s: float


# ---------------------------------------------------------------- the shared setup


def compose_config(overrides: list[str]) -> Any:
    """vlmtrain's `train` config with the benchmark's overrides, as `vlmtrain-train` would see it."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("vlmtrain.configs", version_base="1.3"):
        return compose("train", overrides=overrides)


def count_params(cfg: Any, openclip_dir: Path) -> tuple[int, int]:
    """Parameter counts of vlmtrain's model and of open_clip's model from the generated config."""
    import open_clip
    from hydra.utils import instantiate

    ours = instantiate(cfg.model)
    logging.disable(logging.WARNING)  # open_clip warns that the model has no pretrained weights
    theirs = open_clip.create_model(f"local-dir:{openclip_dir}", device="cpu")
    logging.disable(logging.NOTSET)
    return sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in theirs.parameters())


def shards_needed(steps: int, batch_size: int, workers: int) -> int:
    """Enough whole shards that every worker yields its share of `steps` batches within one epoch."""
    batches_per_worker = math.ceil(steps / workers)
    shards_per_worker = math.ceil((batches_per_worker * batch_size + batch_size) / SAMPLES_PER_SHARD)
    return shards_per_worker * workers


def ensure_photos(work_dir: Path, count: int, steps: int, batch_size: int, workers: int) -> tuple[Path, str]:
    """`count` photo-like JPEGs of 480x360-640x480 (benchmarks/data_decode.py's), written once."""
    from data_decode import make_photos  # this directory is on sys.path: the script runs from it

    if count // workers < (math.ceil(steps / workers) + 1) * batch_size:
        raise SystemExit(f"error: --photos {count} is too few for {steps} steps of {batch_size}")
    root = work_dir / f"photos-{count}"
    return root, make_photos(root, count)


def ensure_data(work_dir: Path, shards: int) -> tuple[Path, str]:
    """The synthetic train shards (written once) as a directory and as a brace pattern."""
    from vlmtrain.datasets.synthetic import ensure_synthetic

    samples = shards * SAMPLES_PER_SHARD
    root = ensure_synthetic(work_dir / f"synthetic-{samples}", samples, val_samples=100, seed=0)
    names = sorted(p.stem for p in (root / "train").glob("*.tar"))
    return root / "train", f"{root / 'train'}/{{{names[0]}..{names[-1]}}}.tar"


# ---------------------------------------------------------------- running and reading each trainer


def run_logged(command: list[str], log_file: Path) -> float:
    """Run `command` with its output in `log_file`; return wall seconds, or exit with the log's tail."""
    start = time.perf_counter()
    with open(log_file, "w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"error: {command[0]} exited with {code}; end of {log_file}:\n{tail}")
    return time.perf_counter() - start


def vlmtrain_windows(run_dir: Path, batch_size: int) -> list[Window]:
    """Windows from metrics.jsonl: each row's samples_per_s covers the steps since the previous row."""
    windows, previous = [], 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "samples_per_s" not in row:
            continue
        steps = row["step"] - previous
        seconds = steps * batch_size / row["samples_per_s"]
        wait = row.get("data_wait")
        windows.append(Window(row["step"], steps, seconds, None if wait is None else wait * seconds))
        previous = row["step"]
    return windows


def openclip_windows(log_file: Path, batch_size: int) -> list[Window]:
    """Windows from out.log: 'Batch (t)' and 'Data (t)' average the steps since the previous line."""
    windows, previous = [], 0
    for match in OPENCLIP_LOG_LINE.finditer(log_file.read_text()):
        done = int(match.group(1)) // batch_size
        steps = done - previous
        data_t, batch_t = float(match.group(2)), float(match.group(3))
        windows.append(Window(done, steps, steps * batch_t, steps * data_t))
        previous = done
    return windows


def steady_rate(windows: list[Window], skip: int, batch_size: int) -> Rate:
    """The rate over the logged windows that start after `skip` steps."""
    timed = [w for w in windows if w.end_step - w.steps >= skip]
    if not timed:
        raise SystemExit(f"error: no logged window starts after step {skip}; raise --steps")
    steps, seconds = sum(w.steps for w in timed), sum(w.seconds for w in timed)
    typical_step = statistics.median(w.seconds / w.steps for w in timed)
    waits = [w.data_seconds for w in timed]
    wait = None if None in waits else sum(waits) / seconds
    return Rate(steps * batch_size / seconds, batch_size / typical_step, steps, wait)


@dataclass
class Setup:
    args: argparse.Namespace
    overrides: list[str]  # Hydra overrides for vlmtrain-train (run_dir added per run)
    openclip_args: list[str]  # open_clip_train options (--logs/--name added per run)
    flops: float = 0.0  # training FLOPs per image-caption pair
    peak: float | None = None  # the device's peak FLOP/s, where known: the tables then show MFU


def vlmtrain_command(setup: Setup, run_dir: Path) -> list[str]:
    return [str(setup.args.vlmtrain), *setup.overrides, f"run_dir={run_dir}"]


def openclip_command(setup: Setup, logs: Path, name: str) -> list[str]:
    entry = [str(setup.args.openclip_python), str(Path(__file__).resolve().with_name("openclip_side.py"))]
    return [*entry, *setup.openclip_args, f"--logs={logs}", f"--name={name}"]


def run_vlmtrain(setup: Setup, repeat: int) -> RunResult:
    args = setup.args
    run_dir = args.work_dir / "runs" / f"vlmtrain-{repeat}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    command = vlmtrain_command(setup, run_dir)
    wall = run_logged(command, run_dir.parent / f"vlmtrain-{repeat}.log")
    rate = steady_rate(vlmtrain_windows(run_dir, args.batch_size), args.skip, args.batch_size)
    return RunResult("vlmtrain", repeat, rate, os.getloadavg()[0], wall)


def run_openclip(setup: Setup, repeat: int) -> RunResult:
    args = setup.args
    logs, name = args.work_dir / "runs", f"openclip-{repeat}"
    shutil.rmtree(logs / name, ignore_errors=True)
    command = openclip_command(setup, logs, name)
    wall = run_logged(command, logs / f"{name}.log")
    rate = steady_rate(openclip_windows(logs / name / "out.log", args.batch_size), args.skip, args.batch_size)
    return RunResult("open_clip", repeat, rate, os.getloadavg()[0], wall)


# ---------------------------------------------------------------- the benchmark


def prepare(args: argparse.Namespace) -> Setup:
    """Data, the open_clip model config and both trainers' arguments, checked to describe one model."""
    workers = max(1, args.workers)
    args.steps = math.ceil(args.steps / workers) * workers  # open_clip_train: whole batches per worker
    if args.photos:
        train_dir, train_pattern = ensure_photos(
            args.work_dir, args.photos, args.steps, args.batch_size, workers
        )
    else:
        train_dir, train_pattern = ensure_data(
            args.work_dir, shards_needed(args.steps, args.batch_size, workers)
        )
    overrides = [
        f"trainer.max_steps={args.steps}",
        f"trainer.checkpoint_every={args.steps + 1}",
        f"trainer.log_every={args.log_every}",
        f"trainer.precision={args.precision}",
        f"trainer.device={args.device}",
        "trainer.wandb=false",
        "trainer.eval_every=null",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        f"data.train_shards={train_dir}",
        "data.random_crop_scale=[0.9,1.0]",
        "data.val_shards=null",
        "data.zeroshot_dir=null",
        "data.synthetic=null",
        "seed=0",
        *args.override,
    ]
    cfg = compose_config(overrides)
    model_dir = args.work_dir / "openclip-model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": openclip_model_cfg(cfg)}, indent=1)
    )
    ours, theirs = count_params(cfg, model_dir)
    if ours != theirs:
        raise SystemExit(f"error: vlmtrain's model has {ours} parameters, open_clip's {theirs}")
    print(f"model: {ours / 1e6:.2f}M parameters on both sides ({model_dir / 'open_clip_config.json'})")
    openclip_args = [
        f"--model=local-dir:{model_dir}",
        f"--train-data={train_pattern}",
        f"--train-num-samples={args.steps * args.batch_size}",
        "--epochs=1",
        f"--batch-size={args.batch_size}",
        f"--workers={args.workers}",
        f"--device={args.device}",
        f"--log-every-n-steps={args.log_every}",
        "--seed=0",
        *openclip_train_args(cfg),
    ]
    flops, peak = train_flops(overrides), device_peak(args)
    if peak is not None:
        print(f"MFU: {flops / 1e9:.1f} GFLOPs per pair per training step, peak {peak / 1e12:.1f} TFLOP/s")
    return Setup(args, overrides, openclip_args, flops, peak)


def device_peak(args: argparse.Namespace) -> float | None:
    """`--peak-tflops`, or on CUDA the GPU's dense peak for the precision (asked of a short-lived process,
    so that this one holds no CUDA context while the trainers run)."""
    import torch

    from vlmtrain.report.flops import peak_flops

    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if args.device != "cuda":
        return None
    query = "import torch; print(torch.cuda.get_device_name())"
    done = subprocess.run([sys.executable, "-c", query], capture_output=True, text=True)
    name = done.stdout.strip() if done.returncode == 0 else "a GPU torch cannot name"
    peak = peak_flops(name, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    if peak is None:
        print(f"no peak FLOP/s known for {name}: pass --peak-tflops for MFU")
    return peak


def mfu_text(samples_per_s: float, setup: Setup) -> str:
    from vlmtrain.report.flops import mfu

    assert setup.peak is not None
    return f"{mfu(samples_per_s, setup.flops, setup.peak):.1%}"


def runs_table(results: list[RunResult], setup: Setup) -> list[str]:
    shown = setup.peak is not None  # MFU only where the peak is known
    lines = [
        "| repeat | trainer | samples/s | typical-step samples/s | timed steps | data wait | load | wall s |"
        + (" MFU |" if shown else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if shown else ""),
    ]
    for r in results:
        wait = "n/a" if r.rate.data_wait is None else f"{r.rate.data_wait:.1%}"
        lines.append(
            f"| {r.repeat} | {r.trainer} | {r.rate.samples_per_s:.1f} | {r.rate.typical_samples_per_s:.1f} "
            f"| {r.rate.timed_steps} | {wait} | {r.load:.1f} | {r.wall_s:.0f} |"
            + (f" {mfu_text(r.rate.samples_per_s, setup)} |" if shown else "")
        )
    return lines


def summary(results: list[RunResult], setup: Setup) -> str:
    """Per-run rows; each trainer's median; the ratio of medians and the median of per-repeat ratios;
    each trainer's MFU at its median samples/s, where the peak is known."""
    lines = [
        *runs_table(results, setup),
        "",
        "| | vlmtrain | open_clip | ratio of medians | median of per-repeat ratios |",
    ]
    lines.append("|---|---|---|---|---|")
    for label, field in (("samples/s", "samples_per_s"), ("typical-step samples/s", "typical_samples_per_s")):
        ours = [getattr(r.rate, field) for r in results if r.trainer == "vlmtrain"]
        theirs = [getattr(r.rate, field) for r in results if r.trainer == "open_clip"]
        ratio = statistics.median(ours) / statistics.median(theirs)
        paired = statistics.median(a / b for a, b in zip(ours, theirs))
        lines.append(
            f"| {label} (median) | {statistics.median(ours):.1f} | {statistics.median(theirs):.1f} "
            f"| {ratio:.3f}x | {paired:.3f}x |"
        )
        if setup.peak is not None and field == "samples_per_s":
            ours_mfu, theirs_mfu = (mfu_text(statistics.median(x), setup) for x in (ours, theirs))
            lines.append(f"| MFU (median samples/s) | {ours_mfu} | {theirs_mfu} | | |")
    return "\n".join(lines)


def benchmark(args: argparse.Namespace) -> tuple[Setup, list[RunResult]]:
    setup = prepare(args)
    if args.dry_run:
        runs = args.work_dir / "runs"
        for command in (
            vlmtrain_command(setup, runs / "vlmtrain-0"),
            openclip_command(setup, runs, "openclip-0"),
        ):
            print(shlex.join(command))
        return setup, []
    print(
        f"{args.repeats} alternating repeats x 2 trainers: {args.steps} steps of {args.batch_size} samples, "
        f"{args.workers} data workers, timing steps after the first {args.skip}"
    )
    results = []
    for repeat in range(args.repeats):
        for run in (run_vlmtrain, run_openclip):
            result = run(setup, repeat)
            results.append(result)
            print(
                f"  repeat {repeat} {result.trainer:<9} {result.rate.samples_per_s:7.1f} samples/s "
                f"({result.rate.timed_steps} steps timed, load {result.load:.1f}, {result.wall_s:.0f}s wall)",
                flush=True,
            )
    return setup, results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="training steps per run (all are run)")
    parser.add_argument("--skip", type=int, default=4, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers, both trainers")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="both trainers")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, both")
    parser.add_argument("--repeats", type=int, default=3, help="alternating (vlmtrain, open_clip) pairs")
    parser.add_argument("--log-every", type=int, default=1, help="steps per logged window, both trainers")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "throughput")
    parser.add_argument("--openclip-python", type=Path, default=REPO / ".venv-openclip" / "bin" / "python")
    parser.add_argument("--vlmtrain", type=Path, default=Path(sys.executable).parent / "vlmtrain-train")
    parser.add_argument(
        "--override", action="append", default=[], help="extra Hydra override for vlmtrain (repeatable)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU (default: by GPU)")
    parser.add_argument(
        "--photos", type=int, help="train on this many photo-like JPEGs (480x360-640x480) instead"
    )
    parser.add_argument("--dry-run", action="store_true", help="print one run's commands and stop")
    args = parser.parse_args(argv)
    if args.skip % args.log_every:
        parser.error("--skip must be a multiple of --log-every")
    if args.steps <= args.skip + args.log_every:
        parser.error("--steps must leave at least one logged window after --skip")
    if not args.openclip_python.exists():
        parser.error(f"no {args.openclip_python}: run benchmarks/openclip_env.sh first")
    if not args.vlmtrain.exists():
        parser.error(f"no {args.vlmtrain}: run with the python of the venv vlmtrain is installed in")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.work_dir = args.work_dir.resolve()
    setup, results = benchmark(args)
    if not results:
        return
    table = summary(results, setup)
    print("\n" + table)
    if args.json:
        record = {
            "settings": {k: str(v) for k, v in vars(args).items()},
            "runs": [asdict(r) for r in results],
            "flops_per_pair": setup.flops,
            "peak_flops": setup.peak,
        }
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
