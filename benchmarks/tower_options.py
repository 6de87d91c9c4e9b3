"""Peak memory and speed of one training step with activation checkpointing and torch.compile on or off.

Each setting runs in its own process (so that its peak resident memory is its own): the model from
vlmtrain's config with the given overrides, the CLIP loss, AdamW; `--warmup` steps (compilation
included) and then `--steps` timed steps on random images and captions: samples/s from the wall clock
and, steadier on a shared machine, the process's CPU time per sample. Peak memory is the growth of
the process's peak RSS over the RSS once the model and optimizer exist (on CUDA: the allocator's peak).

    .venv/bin/python benchmarks/tower_options.py                      # the table in BENCHMARKS.md
    .venv/bin/python benchmarks/tower_options.py --batch 256 --model model/image_encoder=openclip_vit_b16 ...
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

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


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(args: argparse.Namespace, checkpointing: bool, compiled: bool) -> dict[str, float]:
    import torch
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    flag = str(checkpointing).lower()
    overrides = [*args.model, f"model.image_encoder.grad_checkpointing={flag}"]
    overrides.append(f"model.text_encoder.grad_checkpointing={flag}")
    with initialize_config_module("vlmtrain.configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, loss_fn = instantiate(cfg.model).to(device), instantiate(cfg.loss)
    if compiled:
        model.image_encoder.compile(), model.text_encoder.compile()
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
    cpu_ms = 1000 * statistics.median(cpu) / args.batch
    return {"samples_per_s": args.batch / statistics.median(times), "cpu_ms": cpu_ms, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the settings, interleaved")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--model", nargs="*", default=MODEL, help="config overrides naming the model")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args, *SETTINGS[args.one])))
        return
    results: dict[str, list[dict[str, float]]] = {name: [] for name in args.settings}
    for _ in range(args.repeats):  # round-robin, so that every setting sees the machine's load swings
        for name in args.settings:
            command = [sys.executable, __file__, *sys.argv[1:], "--one", name]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[name].append(json.loads(out.splitlines()[-1]))
    precision = "bf16" if args.bf16 else "fp32"
    print(
        f"batch {args.batch}, {args.device} {precision}, median of {args.steps} steps, best of {args.repeats}"
    )
    print("| setting | samples/s | CPU ms/sample | vs eager | peak memory (MiB) | vs eager |")
    print("|---|---:|---:|---:|---:|---:|")
    best = {  # the least disturbed run of each setting
        name: [
            max(r["samples_per_s"] for r in rs),
            min(r["cpu_ms"] for r in rs),
            min(r["peak_mib"] for r in rs),
        ]
        for name, rs in results.items()
    }
    _, base_cpu, base_peak = best[args.settings[0]]
    for name, (speed, cpu, peak) in best.items():
        print(
            f"| {name} | {speed:.1f} | {cpu:.1f} | {cpu / base_cpu:.2f}x | {peak:.0f} | {peak / base_peak:.2f}x |"
        )


if __name__ == "__main__":
    main()
