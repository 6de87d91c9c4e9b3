"""A sharded run (step folders written by 2 FSDP ranks) exported and evaluated in one process with no
process group: the export holds the ranks' full weights, open_clip loads it and CLIP_benchmark scores it
as `vlmtrain-eval` does; a crafted metadata pickle, value or saved config is refused in one line by eval
and export, and runs nothing."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.distributed.checkpoint as dcp
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.distributed.checkpoint import FileSystemWriter

from tests.helpers.ranks import fork_ranks
from tests.helpers.runs import run_cli
from tests.helpers.tiny import TEXT, VISION, save_tiny_checkpoint, tiny_model_config
from tests.integration.test_clip_benchmark import METRICS
from tests.integration.test_faults_cli import one_line_error
from vlmtrain import cli
from vlmtrain.checkpoint.load import file_key, read_source
from vlmtrain.checkpoint.sharded import load_sharded, save_sharded
from vlmtrain.checkpoint.sharded_full import read_full_checkpoint
from vlmtrain.datasets.synthetic import write_synthetic
from vlmtrain.distributed.sharding import full_state_dict, shard_model
from vlmtrain.losses import ClipLoss

STEP = "step_00000003"


def _train_and_save(rank: int, world: int, run_dir: str, data: dict) -> dict:
    """Two AdamW steps of the sharded tiny model on random pairs, then a sharded checkpoint at step 3."""
    torch.manual_seed(0)
    config = tiny_model_config()
    model = shard_model(instantiate(OmegaConf.create(config)), mixed_precision=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        images = torch.randn(4, 3, VISION["image_size"], VISION["image_size"], generator=g)
        tokens = torch.randint(1, TEXT["vocab_size"], (4, TEXT["context_length"]), generator=g)
        optimizer.zero_grad()
        ClipLoss()(**model(images, tokens)).backward()
        optimizer.step()
    extra = {"config": {"model": config, "data": data}, "train_state": {"step": 3}}
    save_sharded(Path(run_dir) / "checkpoints", 3, model=model, optimizer=optimizer, extra=extra)
    return {"weights": full_state_dict(model)}  # rank 0's; {} on rank 1


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(run dir, zero-shot set the run names, the full weights the ranks saved)."""
    root = tmp_path_factory.mktemp("sharded")
    data = write_synthetic(root / "data", train_samples=1, val_samples=64, seed=2)
    zeroshot = data / "classification"
    (root / "ranks").mkdir()
    ranks = fork_ranks(_train_and_save, 2, root / "ranks", str(root / "run"), {"zeroshot_dir": str(zeroshot)})
    return root / "run", zeroshot, ranks[0]["weights"]


@pytest.mark.slow
def test_export_of_a_sharded_run_is_scored_by_clip_benchmark_as_vlmtrain_eval(
    sharded_run, tmp_path, capsys, monkeypatch
):
    """Slow (~15 s): 2 forked ranks train and save; CLIP_benchmark's CLI loads and scores the export."""
    run_dir, zeroshot, weights = sharded_run
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", STEP]
    source = read_source(run_dir)  # the run's newest checkpoint is the step folder
    assert source.path == run_dir / "checkpoints" / STEP and source.step == 3
    assert source.weights["logit_scale"].shape == (1,)  # sharded: a scalar saved as a 1-element vector

    exported = run_cli(cli.export, [str(run_dir), "--out", str(tmp_path / "export")], capsys)
    assert exported.returncode == 0 and "wrote open_clip format" in exported.stdout, exported.stderr
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    theirs = model.state_dict()  # loaded strictly by open_clip: every weight, the ranks' full values
    prefixes = json.loads((tmp_path / "export" / "vlmtrain_config.json").read_text())["key_prefixes"]
    assert {file_key(k, prefixes) for k in weights} == set(theirs)
    for key, value in weights.items():
        assert torch.equal(theirs[file_key(key, prefixes)], value), key

    step_folder = run_dir / "checkpoints" / STEP
    evaluated = run_cli(cli.evaluate, [f"checkpoint={step_folder}"], capsys)  # on the run's own set
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((run_dir / "eval" / f"{STEP}.json").read_text())["metrics"]
    assert metrics["zeroshot/num_samples"] == 64
    benchmark = clip_benchmark(tmp_path / "export", zeroshot, tmp_path, monkeypatch)
    for key in METRICS:
        assert benchmark[key] == pytest.approx(metrics[f"zeroshot/{key}"], abs=1e-6), (key, benchmark)


def clip_benchmark(model_dir: Path, dataset_dir: Path, out_dir: Path, monkeypatch) -> dict[str, float]:
    """`clip_benchmark eval` offline on the CPU in full precision, its CLI run in this process."""
    from clip_benchmark import cli as benchmark_cli

    argv = [
        *("clip_benchmark", "eval", "--model", f"local-dir:{model_dir}", "--pretrained", ""),
        *("--dataset", "wds/synthetic", "--dataset_root", str(dataset_dir)),
        *("--task", "zeroshot_classification", "--output", str(out_dir / "result.json")),
        *("--no_amp", "--num_workers", "0", "--batch_size", "64"),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(out_dir)
    with torch.random.fork_rng():  # it seeds torch's generator
        benchmark_cli.main()
    return json.loads((out_dir / "result.json").read_text())["metrics"]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _refused_by_eval_and_export(source: Path, tmp_path: Path, capsys, needle: str) -> None:
    one_line_error(
        run_cli(cli.evaluate, [f"checkpoint={source}", "zeroshot_dir=/nowhere"], capsys), 2, needle
    )
    one_line_error(run_cli(cli.export, [str(source), "--out", str(tmp_path / "x")], capsys), 2, needle)
    assert not (tmp_path / "x").exists()


def test_a_crafted_metadata_file_is_refused_by_eval_and_export(tmp_path, capsys):
    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    folder = run_dir / "checkpoints" / STEP
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    for source in (run_dir, folder):
        _refused_by_eval_and_export(source, tmp_path, capsys, "refused: its metadata would build io.open")
    assert not marker.exists()


def test_a_crafted_value_or_saved_config_is_refused_by_eval_and_export(tmp_path, capsys):
    marker, model = tmp_path / "ran", torch.nn.Linear(2, 2)
    folder = tmp_path / "crafted" / STEP
    dcp.save(
        {"model": model.state_dict(), "config": _Payload(marker)}, storage_writer=FileSystemWriter(folder)
    )
    _refused_by_eval_and_export(folder, tmp_path, capsys, "config: refused: not a plain value")
    assert not marker.exists()

    config = tiny_model_config() | {"_target_": "builtins.exec"}  # the config check, as for a .pt file
    optimizer = torch.optim.AdamW(model.parameters())
    folder = save_sharded(
        tmp_path / "run", 1, model=model, optimizer=optimizer, extra={"config": {"model": config}}
    )
    _refused_by_eval_and_export(folder, tmp_path, capsys, "saved config model._target_ refused")


def test_a_run_dir_reads_its_newest_checkpoint_a_step_folder_or_a_file(tmp_path):
    """A run that switched between sharded and unsharded checkpoints is read where a resume would start:
    the step `latest` names, of either kind, else the newest."""
    checkpoints, config = tmp_path / "run" / "checkpoints", tiny_model_config()
    save_tiny_checkpoint(checkpoints / "step_00000001.pt", config)
    model = instantiate(OmegaConf.create(config))
    optimizer = torch.optim.AdamW(model.parameters())
    extra = {"config": {"model": config}, "train_state": {"step": 2}}
    save_sharded(checkpoints, 2, model=model, optimizer=optimizer, extra=extra)
    assert read_source(tmp_path / "run").path == checkpoints / "step_00000002"
    save_tiny_checkpoint(checkpoints / "step_00000005.pt", config)
    assert read_source(tmp_path / "run").path == checkpoints / "step_00000002"  # what `latest` names
    (checkpoints / "latest").write_text("step_00000005.pt")  # as the save of step 5 leaves it
    assert read_source(tmp_path / "run").path == checkpoints / "step_00000005.pt"
    (checkpoints / "latest").unlink()
    assert read_source(tmp_path / "run").path == checkpoints / "step_00000005.pt"  # the newest


def test_the_run_config_is_saved_whole_and_read_back_as_saved(tmp_path):
    """Kept as one value: the format would flatten a dict into its leaves and drop the empty ones."""
    config = {
        "model": {"embed_dim": 8},
        "data": {"zeroshot": {}, "val_shards": None},
        "optim": {"betas": [0.9]},
    }
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    folder = save_sharded(tmp_path, 1, model=model, optimizer=optimizer, extra={"config": config})
    assert load_sharded(folder, model=model, optimizer=optimizer, extra={"config": {}}) == {"config": config}
    assert read_full_checkpoint(folder)["config"] == config
