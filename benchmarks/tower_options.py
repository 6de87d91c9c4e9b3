"""Peak memory and speed of one training step with activation checkpointing and torch.compile on or off.

Each setting runs in its own process (so that its peak resident memory is its own): the model from
vlmtrain's config with the given overrides, the CLIP loss, AdamW; `--warmup` steps (compilation
included) and then `--steps` timed steps on random images and captions: samples/s from the wall clock
and, steadier on a shared machine, the process's CPU time per sample. Peak memory is the growth of
the process's peak RSS over the RSS once the model and optimizer exist (on CUDA: the allocator's peak).
MFU is samples/s times the model's training FLOPs per pair (vlmtrain.report.flops, counted on the meta
device without checkpointing's recomputation) over the GPU's dense peak for the precision (or
`--peak-tflops`). `--largest-batch` (CUDA) first finds each setting's largest batch that completes its
steps: doubling from `--batch` until the GPU runs out of memory, then bisecting to a multiple of 8, each
try in a process of its own; the table's row for a setting is then timed at its own batch.

    .venv/bin/python benchmarks/tower_options.py                      # the table in BENCHMARKS.md
    .venv/bin/python benchmarks/tower_options.py --batch 256 --model model/image_encoder=openclip_vit_b16 ...

On a GPU, ViT-B/16 (the `clip_vit_b16` preset) in bf16 at each setting's largest batch, with MFU:

    .venv/bin/python benchmarks/tower_options.py --device cuda --bf16 --largest-batch --model preset=clip_vit_b16

Sharded (`--sharded`: FSDP2 as `trainer.parallel=fsdp` applies it, on one GPU), ViT-L/14 against the
same unsharded, and ViT-H/14:

    .venv/bin/python benchmarks/tower_options.py --device cuda --bf16 --largest-batch --settings eager \
        checkpointing --model preset=clip_vit_l14 [--sharded]
    .venv/bin/python benchmarks/tower_options.py --device cuda --bf16 --largest-batch --settings \
        checkpointing --model preset=clip_vit_h14 --sharded
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

SETTINGS = {  # name: (activation checkpointing, compile)
    "eager": (False, False),
    "checkpointing": (True, False),
    "compile": (False, True),
    "checkpointing + compile": (True, True),
}
MODEL = [  # a ViT of width 256 and depth 6 on 64x64 images (8-pixel patches), a matching text tower
    "model.embed_dim=256",
    "model.image_encoder.vision_cfg.width=256",
    "model.image_encoder.vision_cfg.layers=6",
    "model.image_encoder.vision_cfg.patch_size=8",
    "model.text_encoder.text_cfg.width=256",
    "model.text_encoder.text_cfg.layers=6",
    "model.text_encoder.context_length=32",
]
OOM_EXIT = 3  # a setting's process exits with this when its batch does not fit in the GPU's memory


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compose_model(overrides: list[str], checkpointing: bool) -> Any:
    """The `train` config with the model overrides and both towers' activation checkpointing set."""
    from hydra import compose, initialize_config_module

    flag = str(checkpointing).lower()
    overrides = [*overrides, f"model.image_encoder.grad_checkpointing={flag}"]
    overrides.append(f"model.text_encoder.grad_checkpointing={flag}")
    with initialize_config_module("vlmtrain.configs", version_base="1.3"):
        return compose("train", overrides=overrides)


def one(args: argparse.Namespace, checkpointing: bool, compiled: bool) -> dict[str, Any]:
    import torch
    from hydra.utils import instantiate

    cfg = compose_model(args.model, checkpointing)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, loss_fn = instantiate(cfg.model).to(device), instantiate(cfg.loss)
    if compiled:
        model.image_encoder.compile(), model.text_encoder.compile()
    if args.sharded:
        model = sharded(model, device, args.bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size, length = model.image_encoder.image_size, model.text_encoder.context_length
    images = torch.randn(args.batch, 3, size, size, device=device)
    tokens = torch.randint(1, 49000, (args.batch, length), device=device)

    def step() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            loss = loss_fn(**model(images, tokens))
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu

    base = rss_mib()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu = zip(*[step() for _ in range(args.steps)], strict=True)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib() - base
    return {
        "batch": args.batch,
        "samples_per_s": args.batch / statistics.median(times),
        "cpu_ms": 1000 * statistics.median(cpu) / args.batch,
        "peak_mib": peak,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def sharded(model: Any, device: Any, bf16: bool) -> Any:
    """The model as `trainer.parallel=fsdp` shards it, over a group of this one process: a rank's work
    and memory per step (at N GPUs it holds 1/N of the weights, gradients and AdamW state besides)."""
    import socket

    import torch.distributed as dist

    from vlmtrain.distributed.sharding import shard_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", address, rank=0, world_size=1)
    return shard_model(model, mixed_precision=bf16 and device.type == "cuda")


def out_of_memory(error: BaseException | None) -> bool:
    """Whether the GPU ran out of memory, also where compilation wrapped the error in its own."""
    import torch

    while error is not None:
        if isinstance(error, torch.OutOfMemoryError) or "CUBLAS_STATUS_ALLOC_FAILED" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def run_setting(name: str, batch: int, may_fail: bool = False) -> dict[str, Any] | None:
    """One setting at `batch` in a process of its own; None where the batch does not fit (or, with
    `may_fail`, fails otherwise, e.g. a kernel's size limit: the error is printed)."""
    command = [sys.executable, __file__, *sys.argv[1:], "--batch", str(batch), "--one", name]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode == OOM_EXIT:
        return None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        if may_fail:
            print(f"{name}, batch {batch}: failed, taken as not fitting: {last}", file=sys.stderr)
            return None
        raise SystemExit(f"error: {name} at batch {batch} exited with {done.returncode}:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def largest_batch(fits: Callable[[int], bool], start: int, multiple: int = 8, limit: int = 2**16) -> int:
    """The largest multiple of `multiple` that `fits`, for a `fits` that holds up to some batch and not
    beyond: double from `start` until a batch does not fit (or `limit` does), then bisect."""
    low, high = 0, max(multiple, -(-start // multiple) * multiple)  # low fits (trivially), high untried
    while high <= limit and fits(high):
        low, high = high, 2 * high
    if high > limit:
        return low
    while high - low > multiple:  # low fits, high does not
        middle = low + (high - low) // multiple // 2 * multiple
        low, high = (middle, high) if fits(middle) else (low, middle)
    if low == 0:
        raise SystemExit(f"error: not even a batch of {multiple} fits")
    return low


def search(name: str, start: int) -> dict[str, Any]:
    """The run of a setting at the largest batch that fits (its tries' results are kept: the last
    fitting one is that run)."""
    runs: dict[int, dict[str, Any]] = {}

    def fits(batch: int) -> bool:
        result = run_setting(name, batch, may_fail=bool(runs))
        if result is not None:
            runs[batch] = result
        print(f"{name}: batch {batch} {'fits' if result else 'does not fit'}", file=sys.stderr, flush=True)
        return result is not None

    return runs[largest_batch(fits, start)]


def run_all(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Each setting's runs, `--repeats` rounds over the settings (the first one searching for the
    largest batch where asked; later ones run at the batch it found)."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in args.settings}
    for round_ in range(args.repeats):  # round-robin, so that every setting sees the machine's load swings
        for name in args.settings:
            if args.largest_batch and round_ == 0:
                results[name].append(search(name, args.batch))
                continue
            batch = results[name][0]["batch"] if results[name] else args.batch
            result = run_setting(name, batch, may_fail=bool(results[name]))
            if result is not None:
                results[name].append(result)
            elif not results[name]:
                raise SystemExit(f"error: {name}: batch {batch} does not fit in the GPU's memory")
            else:  # a largest batch may fit only most of the time (fragmentation, autotuning)
                print(f"{name}: batch {batch} did not fit this time; left out", file=sys.stderr)
    return results


def best_runs(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The least disturbed run of each setting: its highest speed, least CPU time and memory."""
    return {
        name: {
            "batch": rs[0]["batch"],
            "samples_per_s": max(r["samples_per_s"] for r in rs),
            "cpu_ms": min(r["cpu_ms"] for r in rs),
            "peak_mib": min(r["peak_mib"] for r in rs),
        }
        for name, rs in results.items()
    }


def train_flops(model_overrides: list[str]) -> float:
    """Training FLOPs per image-caption pair of the model, without checkpointing's recomputation."""
    from hydra.utils import instantiate

    from vlmtrain.report.flops import train_flops_per_sample

    cfg = compose_model(model_overrides, checkpointing=False)
    return train_flops_per_sample(lambda: instantiate(cfg.model))


def table(best: dict[str, dict[str, Any]], flops: float, peak: float | None) -> list[str]:
    """The markdown rows: each setting's best run, against the first setting's; MFU where `peak` is known."""
    from vlmtrain.report.flops import mfu

    lines = [
        "| setting | batch | samples/s | CPU ms/sample | vs first | peak memory (MiB) | vs first | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first = next(iter(best.values()))
    for name, r in best.items():
        util = "n/a" if peak is None else f"{mfu(r['samples_per_s'], flops, peak):.1%}"
        lines.append(
            f"| {name} | {r['batch']} | {r['samples_per_s']:.1f} | {r['cpu_ms']:.1f} "
            f"| {r['cpu_ms'] / first['cpu_ms']:.2f}x | {r['peak_mib']:.0f} "
            f"| {r['peak_mib'] / first['peak_mib']:.2f}x | {util} |"
        )
    return lines


def peak_of(args: argparse.Namespace, device_name: str) -> float | None:
    import torch

    from vlmtrain.report.flops import peak_flops

    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if args.device.startswith("cuda"):
        peak = peak_flops(device_name, torch.bfloat16 if args.bf16 else torch.float32)
        if peak is None:
            print(f"no peak FLOP/s known for {device_name}: pass --peak-tflops for MFU", file=sys.stderr)
        return peak
    return None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the settings, interleaved")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--sharded", action="store_true", help="shard the model as trainer.parallel=fsdp")
    parser.add_argument("--model", nargs="*", default=MODEL, help="config overrides naming the model")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--largest-batch", action="store_true", help="CUDA: each setting's largest batch")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU (default: by GPU)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.largest_batch and not args.one and not args.device.startswith("cuda"):
        parser.error("--largest-batch needs --device cuda (it searches until the GPU's memory runs out)")
    return args


def main() -> None:
    args = parse_args()
    if args.one:
        try:
            result = one(args, *SETTINGS[args.one])
        except Exception as error:
            if out_of_memory(error):
                sys.exit(OOM_EXIT)
            raise
        print(json.dumps(result))
        return
    flops = train_flops(args.model)
    results = run_all(args)
    device_name = results[args.settings[0]][0]["device_name"]
    peak = peak_of(args, device_name)
    precision = "bf16" if args.bf16 else "fp32"
    print(f"{device_name}, {precision}, median of {args.steps} steps, best of {args.repeats}")
    peak_text = "unknown (--peak-tflops)" if peak is None else f"{peak / 1e12:.1f} TFLOP/s"
    print(f"model: {flops / 1e9:.1f} GFLOPs per pair per training step; peak: {peak_text}")
    print("\n".join(table(best_runs(results), flops, peak)))


if __name__ == "__main__":
    main()
