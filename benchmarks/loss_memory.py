"""Loss memory: forward+backward time and peak memory of each loss on one rank as the global batch grows.

    python benchmarks/loss_memory.py                       # B_local=256, global 1k..16k: every loss
    python benchmarks/loss_memory.py --cases llip llip_dense --b-local 64 --global-sizes 1024 2048 4096

One rank holds B_local image-caption pairs (K mixture tokens per image for Llip); the captions of the
other ranks (B_global - B_local of them) are built in the same process and handed to each loss the way
its ring or gather would hand them over: vlmtrain's sigmoid losses through `remote_blocks`, its CLIP
loss and open_clip's losses by standing in for their gather / neighbour-exchange functions. A warm-up
at B_global = B_local runs first.

Peak memory beyond the inputs counts only what is allocated after the inputs exist, so it includes the
gradients of the inputs; every input takes a gradient, so the last column (peak minus the inputs' size)
is the loss's own working memory. On CUDA the peak is torch.cuda.max_memory_allocated(); on CPU it is the
CPU allocator's running total of allocated bytes, which torch's profiler reports with every allocation
and free (profile_memory=True). Times then include the profiler's per-op overhead, and the profiler's
own memory grows with the number of ops, which limits how long a CPU run can be.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from vlmtrain.losses import ClipLoss, LlipLoss, SigLipLoss
from vlmtrain.losses import clip as clip_module
from vlmtrain.models.llip_head import mix

TAU = 5.0  # Llip's mixing temperature
CASES = ["clip", "clip_open_clip", "siglip", "siglip_open_clip", "llip", "llip_dense"]
LABELS = {
    "clip": "CLIP, vlmtrain (local loss)",
    "clip_open_clip": "CLIP, open_clip (local loss)",
    "siglip": "SigLIP, vlmtrain",
    "siglip_open_clip": "SigLIP, open_clip",
    "llip": "Llip, vlmtrain",
    "llip_dense": "Llip, dense",
}


def open_clip_losses():
    """open_clip's loss.py on its own: importing the package builds its whole model zoo."""
    path = Path(importlib.util.find_spec("open_clip").origin).with_name("loss.py")
    spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leaf(*shape, device, normalize=False):
    x = torch.randn(*shape, device=device)
    return (F.normalize(x, dim=-1) if normalize else x).requires_grad_()


def remote_blocks(args, n_global, width, device, normalize=False):
    """The other ranks' blocks, each its own tensor as if received from the ring (B_local, width)."""
    return [
        leaf(args.b_local, width, device=device, normalize=normalize)
        for _ in range(n_global // args.b_local - 1)
    ]


# ---- one case: build inputs, return a closure computing the loss ----------------------------------------


def pair_case(name, args, n_global, device):
    """CLIP and SigLIP: local features, the other ranks' features, temperature and bias."""
    b, dim, world = args.b_local, args.dim, n_global // args.b_local
    image, text = leaf(b, dim, device=device, normalize=True), leaf(b, dim, device=device, normalize=True)
    remote_text = remote_blocks(args, n_global, dim, device, normalize=True)
    scale = torch.tensor(2.3, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    if name == "siglip":
        loss = SigLipLoss(chunk_size=args.siglip_chunk)
        loss.remote_blocks = lambda packed: remote_text
        return lambda: loss(image, text, scale, bias)
    if name == "siglip_open_clip":
        oc = open_clip_losses()
        loss = oc.SigLipLoss(rank=0, world_size=world, dist_impl="shift")

        def run():
            blocks = iter(remote_text)
            oc.neighbour_exchange_with_grad = lambda left, right, tensor, group=None: next(blocks)
            return loss(image, text, scale.exp(), bias)

        return run
    remote = {id(image): remote_blocks(args, n_global, dim, device, normalize=True), id(text): remote_text}

    def gathered(local):
        return torch.cat([local, *remote[id(local)]])

    if name == "clip_open_clip":
        oc = open_clip_losses()
        oc.gather_features = lambda img, txt, *a, **k: (gathered(img), gathered(txt))
        loss = oc.ClipLoss(local_loss=True, gather_with_grad=True, rank=0, world_size=world)
        return lambda: loss(image, text, scale.exp())
    loss = ClipLoss(local_loss=True)

    def run():
        with (
            mock.patch.object(clip_module, "all_gather_with_grad", gathered),
            mock.patch.object(clip_module, "world_info", lambda: (0, world)),
        ):
            return loss(image, text, scale)

    return run


def llip_case(name, args, n_global, device):
    b, dim, k, h = args.b_local, args.dim, args.tokens, args.heads
    keys, values = leaf(b, h, k, dim // h, device=device), leaf(b, h, k, dim // h, device=device)
    out_proj = leaf(dim, dim, device=device)
    queries, text = leaf(b, h, dim // h, device=device), leaf(b, dim, device=device, normalize=True)
    remote = remote_blocks(args, n_global, dim + dim, device)  # packed (text feature, query) per rank
    scale = torch.tensor(2.3, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    if name == "llip":
        loss = LlipLoss(chunk_size=args.llip_chunk)
        loss.remote_blocks = lambda packed: remote
        return lambda: loss(
            keys, values, queries, text, scale, bias, llip_out_proj=out_proj, llip_temperature=TAU
        )

    def dense():
        all_remote = torch.cat([text.new_zeros(0, 2 * dim), *remote])
        all_text = torch.cat([text, all_remote[:, :dim]])
        all_queries = torch.cat([queries, all_remote[:, dim:].view(-1, h, dim // h)])
        mixed = mix(keys, values, all_queries, out_proj, TAU)  # (B_local, B_global, D), kept for backward
        logits = scale.exp() * torch.einsum("itd,td->it", mixed, all_text) + bias
        signs = -torch.ones_like(logits)
        signs[:, :b].diagonal().fill_(1.0)
        return -F.logsigmoid(signs * logits).sum() / b

    return dense


def build(name, args, n_global, device):
    maker = llip_case if name.startswith("llip") else pair_case
    return maker(name, args, n_global, device)


# ---- measuring -------------------------------------------------------------------------------------


def cpu_allocated(fn):
    """fn(), and the peak and final bytes held by the CPU allocator for allocations made during it: the
    profiler's memory events (profile_memory=True) carry each allocation's size and the allocator's
    running total (which carries over between profiling sessions, hence the baseline)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    memory = sorted((e["ts"], e["args"]) for e in events if e.get("name") == "[memory]")
    if not memory:
        return result, 0, 0
    totals = [args["Total Allocated"] for _, args in memory]
    baseline = totals[0] - memory[0][1]["Bytes"]
    return result, max(totals) - baseline, totals[-1] - baseline


def cuda_allocated(fn):
    """fn(), and the peak and final bytes allocated on the GPU during it, beyond what was there before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - before, torch.cuda.memory_allocated() - before


def measure(name, args, n_global, device) -> dict:
    """Memory from the first forward+backward; time the median of `args.repeats` (CUDA) or the first."""
    gc.collect()  # the previous size's tensors, so that they are not freed while this one is measured
    if device.type == "cuda":
        torch.cuda.empty_cache()
    allocated = cuda_allocated if device.type == "cuda" else cpu_allocated
    step, _, inputs = allocated(lambda: build(name, args, n_global, device))
    precision = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def timed():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with precision:
            loss = step()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    seconds, peak, _ = allocated(timed)
    if device.type == "cuda":
        seconds = statistics.median([seconds] + [timed() for _ in range(args.repeats - 1)])
    return {"seconds": seconds, "peak_mib": peak / 2**20, "inputs_mib": inputs / 2**20}


def dense_llip_bytes(args, n_global) -> float:
    """Rough peak of the dense Llip: attention weights, mixed/projected/normalised embeddings and the
    backward's transients, per (image, caption) pair."""
    return args.b_local * n_global * (2 * args.heads * args.tokens + 5 * args.dim) * 4


def available_bytes() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def sweep(name, args, device):
    """(B_global, result) for every size; a warm-up first (lazy imports, allocator, kernels)."""
    torch.manual_seed(0)
    build(name, args, args.b_local, device)().backward()
    for n_global in args.global_sizes:
        needed = dense_llip_bytes(args, n_global)
        if name == "llip_dense" and device.type == "cpu" and needed > 0.5 * available_bytes():
            yield n_global, {"skipped": f"skipped: needs ~{needed / 2**30:.0f} GiB"}
            continue
        try:
            yield n_global, measure(name, args, n_global, device)
        except torch.OutOfMemoryError:
            total = torch.cuda.get_device_properties(device).total_memory / 2**30
            yield n_global, {"skipped": f"out of memory ({total:.0f} GiB GPU)"}
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--b-local", type=int, default=256)
    parser.add_argument("--global-sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64, help="Llip mixture tokens K")
    parser.add_argument("--heads", type=int, default=8, help="Llip heads H")
    parser.add_argument("--llip-chunk", type=int, default=256)
    parser.add_argument("--siglip-chunk", type=int, default=4096)
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per size on CUDA (median)")
    args = parser.parse_args()
    torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"# B_local={args.b_local} D={args.dim} K={args.tokens} H={args.heads} "
        f"llip_chunk={args.llip_chunk} siglip_chunk={args.siglip_chunk} on {device}, {args.precision}",
        flush=True,
    )
    print(
        "| loss | B_global | fwd+bwd (ms) | inputs (MiB) | peak beyond inputs (MiB) | of which not input grads |"
    )
    print("|---|---:|---:|---:|---:|---:|", flush=True)
    for name in args.cases:
        for n_global, result in sweep(name, args, torch_device):
            if "skipped" in result:
                print(f"| {LABELS[name]} | {n_global} | {result['skipped']} | | | |", flush=True)
                continue
            peak, inputs = result["peak_mib"], result["inputs_mib"]
            print(
                f"| {LABELS[name]} | {n_global} | {1e3 * result['seconds']:.1f} | {inputs:.1f} | {peak:.1f} | "
                f"{peak - inputs:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
