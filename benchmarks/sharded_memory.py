"""Bytes per GPU of parameters + gradients + AdamW state for the large presets, under DDP and under
sharding (FSDP2) at 8, 64 and 256 GPUs, as in BENCHMARKS.md.

Nothing is allocated: each model is built on the meta device and sharded by `shard_model` itself over a
fake process group of N ranks, so the count is rank 0's real shards (FSDP pads a tensor's first dimension
to a multiple of N; rank 0's shard is the largest). Weights, gradients and both AdamW moments are fp32:
4 + 4 + 8 bytes per trainable parameter held. DDP holds all of them on every GPU, and its gradient
buckets (a flat copy of the gradients, 4 bytes per parameter) on top. Activations and the one block whose
weights FSDP gathers at a time are not counted.

    .venv/bin/python benchmarks/sharded_memory.py
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from vlmtrain.distributed.sharding import shard_model

PRESETS = ("clip_vit_b16", "clip_vit_l14", "clip_vit_h14", "clip_vit_bigg14", "llip_vit_bigg14")
WORLDS = (8, 64, 256)
BYTES_HELD = 4 + 4 + 8  # fp32 weight, gradient, AdamW exp_avg and exp_avg_sq
GIB = 2**30


def build(preset: str) -> nn.Module:
    with initialize_config_module("vlmtrain.configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"preset={preset}", "++model.text_encoder.tokenizer_path=/none"])
    with torch.device("meta"):
        return instantiate(cfg.model)


def held(model: nn.Module) -> int:
    """Trainable parameter elements this rank holds (its shards, or everything when not sharded)."""
    local = [getattr(p, "to_local", lambda p=p: p)() for p in model.parameters() if p.requires_grad]
    return sum(t.numel() for t in local)


def sharded_held(preset: str, world: int) -> int:
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        model = shard_model(build(preset), mesh=init_device_mesh("cpu", (world,)), mixed_precision=False)
        return held(model)
    finally:
        dist.destroy_process_group()


def main() -> None:
    heads = " | ".join(f"FSDP, {n} GPUs (GiB)" for n in WORLDS)
    print(f"| preset | parameters (M) | DDP, any N (GiB) | DDP + buckets (GiB) | {heads} |")
    print("|---|---:|---:|---:|" + "---:|" * len(WORLDS))
    for preset in PRESETS:
        total = held(build(preset))
        ddp = total * BYTES_HELD / GIB
        fsdp = " | ".join(f"{sharded_held(preset, n) * BYTES_HELD / GIB:.3f}" for n in WORLDS)
        print(
            f"| {preset} | {total / 1e6:.1f} | {ddp:.2f} | {ddp + total * 4 / GIB:.2f} | {fsdp} |", flush=True
        )


if __name__ == "__main__":
    main()
