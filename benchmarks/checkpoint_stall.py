"""How long one step's sharded checkpoint holds training up, synchronous against asynchronous
(`trainer.async_checkpoint`), for ViT-B/16 sharded over 2 gloo ranks on the CPU, as in BENCHMARKS.md.

Each rank holds its shards of the weights and of AdamW's two moments (the state filled by one optimizer
step on zero gradients: no forward is needed to have a real optimizer state to write). A save is timed
from its call until training could go on: the whole write when synchronous; when asynchronous, the copy
to host memory and the hand-off to the writing thread (the write itself is then timed until the folder
is in place). Each kind is saved `--repeats` times, alternating, into a fresh folder each time.

    .venv/bin/python benchmarks/checkpoint_stall.py [--repeats 3] [--preset clip_vit_b16]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from vlmtrain.checkpoint.sharded import save_sharded, save_sharded_async
from vlmtrain.distributed.sharding import shard_model

WORLD = 2


def build(preset: str) -> torch.nn.Module:
    with initialize_config_module("vlmtrain.configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"preset={preset}", "++model.text_encoder.tokenizer_path=/none"])
    return instantiate(cfg.model)


def sharded_with_state(preset: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = shard_model(build(preset), mixed_precision=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()  # fills both moments: the state a training run writes
    return model, optimizer


def _timed(save, folder: Path) -> tuple[float, float]:
    """(seconds training is held up, seconds until the step folder is in place)."""
    dist.barrier()
    start = time.perf_counter()
    pending = save(folder)
    stall = time.perf_counter() - start
    if pending is not None:
        pending.wait()
    dist.barrier()
    return stall, time.perf_counter() - start


def _rank(rank: int, port: int, preset: str, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(minutes=10)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timeout)
    writer_group = dist.new_group(backend="gloo")
    model, optimizer = sharded_with_state(preset)
    parts = dict(model=model, optimizer=optimizer, keep_last=0)

    def sync(folder: Path) -> None:
        save_sharded(folder, 1, **parts)

    def background(folder: Path):
        return save_sharded_async(folder, 1, process_group=writer_group, **parts)

    rows: dict[str, list[tuple[float, float]]] = {"synchronous": [], "asynchronous": []}
    for repeat in range(repeats):
        for name, save in (("synchronous", sync), ("asynchronous", background)):
            rows[name].append(_timed(save, Path(out) / f"{name}-{repeat}"))
    if rank == 0:
        for name, times in rows.items():
            stall = statistics.median(t[0] for t in times)
            done = statistics.median(t[1] for t in times)
            print(f"| {name} | {stall:.2f} | {done:.2f} | {', '.join(f'{t[0]:.2f}' for t in times)} |")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="clip_vit_b16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"{args.preset}, {WORLD} gloo ranks, load {os.getloadavg()[0]:.1f}")
    print("| save | stall s (median) | in place s (median) | stall s (each) |")
    print("|---|---:|---:|---|")
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _rank, args=(port, args.preset, args.repeats, out), nprocs=WORLD, start_method="spawn"
        )


if __name__ == "__main__":
    main()
