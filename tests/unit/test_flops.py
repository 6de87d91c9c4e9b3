"""The training FLOPs counted on the meta device against a real CPU step's count; GPUs' peaks; MFU; the
largest-batch search and MFU table of benchmarks/tower_options.py; benchmarks/throughput.py's MFU."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers.runs import LOSSES, SMALL_MODEL, compose_train
from vlmtrain.report.flops import count_flops, mfu, peak_flops, train_flops_per_sample

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def script(name: str):
    if str(BENCHMARKS) not in sys.path:  # as when run: a script imports its sibling modules
        sys.path.append(str(BENCHMARKS))
    if f"benchmark_{name}" not in sys.modules:  # registered: dataclasses look their module up there
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[f"benchmark_{name}"]


def tower_options():
    return script("tower_options")


@pytest.mark.parametrize("loss", ["clip", "llip"])
def test_meta_count_equals_a_real_cpu_training_step(loss):
    cfg = compose_train([*SMALL_MODEL, *LOSSES.get(loss, [])])
    per_pair = train_flops_per_sample(lambda: instantiate(cfg.model))
    torch.manual_seed(0)
    model, loss_fn = instantiate(cfg.model), instantiate(cfg.loss)
    optimizer = torch.optim.AdamW(model.parameters())
    batch, size = 4, model.image_encoder.image_size
    images = torch.randn(batch, 3, size, size)
    tokens = torch.randint(1, 1000, (batch, model.text_encoder.context_length))
    # torch has no FLOP formula for the CPU's fused attention kernel: the math one is counted as matmuls
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn(**model(images, tokens)).backward()
        optimizer.step()
    assert counter.get_total_flops() == pytest.approx(batch * per_pair, rel=0.01)


def test_backward_costs_about_twice_the_forward_and_the_b16_preset_as_the_readme_says():
    cfg = compose_train(["preset=clip_vit_b16"])
    flops = count_flops(lambda: instantiate(cfg.model))
    assert flops.forward / 1e9 == pytest.approx(41.1, abs=0.05)  # README's presets table
    assert 1.95 < flops.backward / flops.forward <= 2.0  # no input gradient for the images
    assert flops.train == flops.forward + flops.backward
    assert count_flops(lambda: instantiate(cfg.model), backward=False).backward == 0


@pytest.mark.parametrize(
    "name,dtype,peak",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),
        ("NVIDIA H100 80GB HBM3", torch.float32, 67e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
        ("NVIDIA H200", torch.float16, 989.4e12),
        ("NVIDIA A100-SXM4-40GB", torch.bfloat16, 312e12),
        ("NVIDIA A100 80GB PCIe", torch.float32, 19.5e12),
        ("NVIDIA L40S", torch.bfloat16, 362e12),
        ("NVIDIA GeForce RTX 3090", torch.bfloat16, None),
        ("NVIDIA H100 80GB HBM3", torch.int8, None),
    ],
)
def test_peak_by_a_substring_of_the_device_name(name, dtype, peak):
    assert peak_flops(name, dtype) == peak


def test_mfu_is_achieved_over_peak_flops():
    assert mfu(1000.0, 123e9, 989.4e12) == pytest.approx(1000 * 123e9 / 989.4e12)
    assert mfu(2.0, 3.0, 12.0) == 0.5


def largest(limit: int, start: int) -> tuple[int, list[int]]:
    tries: list[int] = []

    def fits(batch: int) -> bool:
        tries.append(batch)
        return batch <= limit

    return tower_options().largest_batch(fits, start), tries


def test_largest_batch_doubles_then_bisects_to_a_multiple_of_8():
    batch, tries = largest(1003, start=128)
    assert batch == 1000 and tries[:4] == [128, 256, 512, 1024]
    assert all(t % 8 == 0 for t in tries) and len(tries) == 10
    assert largest(50, start=128)[0] == 48  # the first batch does not fit: bisect below it
    assert largest(4096, start=100)[0] == 4096  # started at 104, exactly at the limit
    with pytest.raises(SystemExit, match="not even a batch of 8"):
        largest(7, start=64)


def test_table_has_mfu_where_the_peak_is_known():
    run = {"batch": 512, "samples_per_s": 1000.0, "cpu_ms": 2.0, "peak_mib": 40000.0}
    options = tower_options()
    rows = options.table({"eager": run, "compile": {**run, "batch": 640}}, 123e9, 989.4e12)
    assert rows[2].startswith("| eager | 512 | 1000.0 |") and rows[2].endswith("| 12.4% |")
    assert rows[3].startswith("| compile | 640 |")
    assert options.table({"eager": run}, 123e9, None)[2].endswith("| n/a |")


def test_out_of_memory_is_found_through_wrapping_errors():
    options = tower_options()
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as error:
            raise RuntimeError("compiled graph failed") from error
    except RuntimeError as wrapped:
        assert options.out_of_memory(wrapped)
    assert not options.out_of_memory(ValueError("shape mismatch"))


def throughput_results(throughput):
    rate = throughput.Rate(samples_per_s=100.0, typical_samples_per_s=110.0, timed_steps=20, data_wait=None)
    return [
        throughput.RunResult(trainer, 0, rate, load=1.0, wall_s=60.0) for trainer in ("vlmtrain", "open_clip")
    ]


def test_throughput_tables_show_mfu_only_where_the_peak_is_known():
    throughput = script("throughput")
    results = throughput_results(throughput)
    plain = throughput.summary(results, throughput.Setup(None, [], [], flops=1e9))
    assert "MFU" not in plain
    with_peak = throughput.summary(results, throughput.Setup(None, [], [], flops=1e9, peak=1e12)).splitlines()
    assert with_peak[0].endswith("| wall s | MFU |") and with_peak[2].endswith("| 60 | 10.0% |")
    assert "| MFU (median samples/s) | 10.0% | 10.0% | | |" in with_peak


def test_the_benchmarks_count_the_model_without_checkpointings_recomputation():
    assert script("throughput").train_flops.__module__ == "tower_options"  # one count for both
    small = [o for o in SMALL_MODEL if o.startswith("model.")]
    on = ["model.image_encoder.grad_checkpointing=true", "model.text_encoder.grad_checkpointing=true"]
    flops = tower_options().train_flops(small)
    assert tower_options().train_flops([*small, *on]) == flops
    cfg = compose_train([*small, *on])
    assert train_flops_per_sample(lambda: instantiate(cfg.model)) > 1.1 * flops  # the blocks recomputed


def test_each_setting_is_searched_once_then_repeated_at_its_batch(monkeypatch):
    options = tower_options()
    limits, calls = {"eager": 700, "checkpointing": 2000}, []

    def run_setting(name, batch, may_fail=False):
        calls.append((name, batch))
        # beyond its limit, and eager's second round at its largest batch once more (fragmentation)
        if batch > limits[name] or calls[-1] == ("eager", 696) and calls.count(calls[-1]) == 2:
            return None
        return {"batch": batch, "samples_per_s": float(len(calls)), "cpu_ms": 1.0, "peak_mib": 1.0}

    monkeypatch.setattr(options, "run_setting", run_setting)
    args = argparse.Namespace(settings=list(limits), repeats=3, largest_batch=True, batch=128)
    results = options.run_all(args)
    assert [r["batch"] for r in results["eager"]] == [696, 696]  # one later run did not fit: left out
    assert [r["batch"] for r in results["checkpointing"]] == [2000, 2000, 2000]
    assert options.best_runs(results)["eager"]["batch"] == 696


def test_a_setting_out_of_memory_exits_with_its_own_code(monkeypatch):
    options = tower_options()

    def one(*args):
        raise RuntimeError("compiled step failed") from torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(options, "one", one)
    monkeypatch.setattr(sys, "argv", ["tower_options.py", "--one", "eager"])
    with pytest.raises(SystemExit) as exited:
        options.main()
    assert exited.value.code == options.OOM_EXIT
