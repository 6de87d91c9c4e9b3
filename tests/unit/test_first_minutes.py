"""What a new user meets first: the commands answer at once (no torch, no open_clip), --help speaks
vlmtrain, and a config mistake is one line saying what to set."""

import logging
import os
import subprocess
import sys

import pytest

from tests.helpers.runs import run_cli
from vlmtrain import cli
from vlmtrain.cli import compose_checked
from vlmtrain.commands import help as app_help
from vlmtrain.config_tree import typed_config
from vlmtrain.data.loader import MAX_AUTO_WORKERS, worker_count
from vlmtrain.datasets.synthetic import ensure_synthetic
from vlmtrain.models import libraries
from vlmtrain.schema import ConfigError, DataConfig
from vlmtrain.train.trainer import warmup_warning

LIGHT_COMMANDS = """
import sys
from vlmtrain.cli import data, evaluate, export, train
from vlmtrain.commands.plot import plot
from vlmtrain.commands.runs import runs

for command, argv in [(runs, ["runs", "NOWHERE"]), (plot, ["plot", "NOWHERE"]), (plot, ["plot", "--help"]),
                      (train, ["train", "--help"]), (evaluate, ["eval", "-h"]), (export, ["export", "--help"]),
                      (data, ["data", "--help"])]:
    sys.argv = argv
    try:
        command()
    except SystemExit:
        pass
print("IMPORTED", sorted(name for name in ("torch", "open_clip", "timm", "transformers") if name in sys.modules))
"""


@pytest.mark.slow  # a second on a quiet machine: one interpreter for every command
def test_runs_plot_and_help_import_neither_torch_nor_open_clip(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_COMMANDS], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.splitlines()[-1] == "IMPORTED []", result.stdout + result.stderr
    assert "usage: vlmtrain-export" in result.stdout and "no runs" in result.stderr


READ_A_SWEEP = """
import json, sys
from pathlib import Path
from vlmtrain.commands.plot import plot
from vlmtrain.commands.runs import runs

for job, lr in enumerate(("1e-3", "3e-3")):
    (Path("sw") / str(job) / ".hydra").mkdir(parents=True)
    (Path("sw") / str(job) / ".hydra" / "overrides.yaml").write_text(f"- optim.lr={lr}\\n")
    (Path("sw") / str(job) / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 2.0}) + "\\n")
runs(["sw"])
plot(["sw", "--out", "curves.png"])
print("IMPORTED", sorted(name for name in ("torch", "open_clip", "omegaconf", "hydra") if name in sys.modules))
"""


@pytest.mark.slow  # a second: one interpreter drawing a figure (matplotlib's import)
def test_runs_and_plot_read_a_sweep_without_torch_or_a_config_library(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", READ_A_SWEEP], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.splitlines()[-1] == "IMPORTED []", result.stdout + result.stderr
    assert "optim.lr" in result.stdout and (tmp_path / "curves.png").stat().st_size > 0


QUICKSTART_MODEL = """
import sys
from vlmtrain.build import build
from vlmtrain.cli import compose_checked
from vlmtrain.models import libraries
from vlmtrain.models.image_encoders import OpenClipVisionEncoder

def imported():
    return sorted(name for name in ("torch", "open_clip", "timm", "transformers") if name in sys.modules)

libraries.import_only_what_is_named()  # what vlmtrain-train, -eval and -export do first
model = build(compose_checked("train", ["experiment=quickstart", "run_dir=unused"]).model, "model")
print("QUICKSTART", type(model.image_encoder).__name__, type(model.text_encoder).__name__, imported())
# A tower whose open_clip config names a timm trunk (as SigLIP's presets do) brings open_clip's timm back.
tower = OpenClipVisionEncoder(8, vision_cfg={"timm_model_name": "vit_tiny_patch16_224", "image_size": 32})
print("TIMM TRUNK", type(tower.tower).__name__, imported())
"""


@pytest.mark.slow  # a process importing torch and open_clip, as training does
def test_a_model_of_open_clip_towers_imports_neither_timm_nor_transformers(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", QUICKSTART_MODEL], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.stdout.splitlines()[-2:] == [
        "QUICKSTART OpenClipVisionEncoder OpenClipTextEncoder ['open_clip', 'torch']",
        "TIMM TRUNK TimmModel ['open_clip', 'timm', 'torch']",
    ], result.stdout + result.stderr


def test_the_commands_import_only_the_libraries_their_config_names(monkeypatch, capsys, tmp_path):
    for command, argv in [
        (cli.train, ["loss=clipp"]),
        (cli.evaluate, ["nope=1"]),
        (cli.export, ["x", "--out", "y"]),
    ]:
        monkeypatch.setattr(libraries, "_only_what_is_named", False)
        run_cli(command, [f"run_dir={tmp_path}", *argv] if command is cli.train else argv, capsys)
        assert libraries._only_what_is_named, command.__name__
    monkeypatch.setattr(libraries, "_only_what_is_named", False)
    run_cli(cli.data, ["--help"], capsys)  # writing datasets builds no model
    assert not libraries._only_what_is_named


def test_train_help_introduces_vlmtrain_and_lists_the_groups_not_the_schemas(capsys):
    shown = run_cli(cli.train, ["--help"], capsys)
    assert shown.returncode == 0 and shown.stdout.startswith(app_help.INTRO)
    assert "Hydra" not in shown.stdout.splitlines()[0] and "schema" not in shown.stdout.replace(
        "schema.py", ""
    )
    lines = shown.stdout.splitlines()
    assert any(
        line.startswith("  loss ") and line.endswith("the contrastive loss: [clip], llip, siglip")
        for line in lines
    )
    groups = [line.split()[0] for line in lines if line.startswith("  ") and not line.startswith("   ")]
    assert sorted(groups) == sorted(app_help.GROUPS)  # every group, each with its line


def test_every_config_group_has_its_line():
    folder = app_help.config_dir()
    assert set(app_help.chosen_defaults(folder / "train.yaml")) == set(app_help.GROUPS)


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["loss=clipp"], "error: loss=clipp: no such option; loss has clip, llip, siglip"),
        (
            ["model/text_encoder=hf"],
            "error: model.text_encoder.path: a Hugging Face model folder is needed for model/text_encoder=hf",
        ),
        (["cluster=nowhere"], "error: cluster=nowhere: no such option; cluster has local, slurm, slurm_8gpu"),
        (["data=nope"], "error: data=nope: no such option; data has digits, synthetic, webdataset"),
    ],
)
def test_a_config_mistake_is_one_line_saying_what_to_set(overrides, line, capsys, tmp_path):
    shown = run_cli(cli.train, [f"run_dir={tmp_path / 'run'}", *overrides], capsys)
    assert shown.returncode == 2 and shown.stderr.splitlines() == [line], shown.stderr


def test_auto_workers_are_the_ranks_share_of_its_cores_capped(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert DataConfig().num_workers == "auto"
    assert worker_count("auto") == MAX_AUTO_WORKERS == 4  # at most 4, as data=webdataset had
    assert worker_count("auto", local_ranks=8) == 2  # 16 cores shared by 8 ranks
    assert worker_count("auto", shards_per_rank=3) == 3  # never more workers than shards to read
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert worker_count("auto") == 2  # a 2-core machine: 2, not 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 ranks on 2 cores
    assert worker_count("auto") == 1 and worker_count(3) == 3 and worker_count(0) == 0
    with pytest.raises(ConfigError, match=r"^data.num_workers: a count \(>= 0\) or auto, got 'many'$"):
        DataConfig(num_workers="many")


def test_writing_the_synthetic_dataset_says_so_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vlmtrain")
    ensure_synthetic(tmp_path / "shapes", train_samples=20, val_samples=10)
    ensure_synthetic(tmp_path / "shapes", train_samples=20, val_samples=10)  # there already: no line
    assert [record.getMessage() for record in caplog.records] == [
        f"writing the built-in synthetic dataset (20 train, 10 val samples) to {tmp_path / 'shapes'}; "
        "later runs reuse it"
    ]


def test_a_run_no_longer_than_its_warmup_is_warned_about():
    base = ["run_dir=unused"]
    config = typed_config(compose_checked("train", [*base, "trainer.max_steps=50"]))
    assert warmup_warning(config) == (
        "schedule.warmup_steps=50 is not shorter than the run (trainer.max_steps=50): "
        "the learning rate never leaves warmup"
    )
    assert warmup_warning(typed_config(compose_checked("train", [*base, "trainer.max_steps=51"]))) is None
