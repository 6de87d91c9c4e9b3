"""Resuming a run with a new config: what must not change is refused in one line naming the keys, what
may change is applied, every launch's config is kept, and metrics.jsonl never repeats a step."""

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.runs import (
    SMALL_MODEL,
    config,
    data_overrides,
    read_metrics,
    restored_logging,
    run_training,
)
from vlmtrain import cli
from vlmtrain.schema import ConfigError

COMMON = [
    "trainer.log_every=1",
    "trainer.checkpoint_every=2",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.val_shards=null",
    "data.zeroshot_dir=null",
]


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory) -> tuple[Path, Path]:
    """A run of 2 steps with its checkpoint, trained once; each test gets a fresh copy at its path."""
    base = tmp_path_factory.mktemp("resume")
    run_training(config(synthetic_root, base / "run", *COMMON, "trainer.max_steps=2"))
    shutil.copytree(base / "run", base / "trained")
    return base / "trained", base / "run"


@pytest.fixture
def run_dir(trained):
    """The 2-step run, as trained, at the path it was trained in."""
    source, run = trained
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(source, run)
    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    "changes,keys",
    [
        (["model.image_encoder.vision_cfg.width=32"], "model.image_encoder.vision_cfg.width: cannot change"),
        (["loss=siglip"], "loss, model.init_logit_bias, model.init_logit_scale: cannot change"),
        (["data.batch_size=16"], r"data.batch_size: 16 per rank x 1 rank\(s\) is a global batch of 16, the "
         r"checkpoint's is 8 \(8 x 1\); the global batch cannot change when resuming"),
        (["optim.lr=0.5"], "optim.lr: cannot change"),
        (["data.shuffle_buffer=5"], "data.shuffle_buffer: cannot change"),
        (["seed=3", "model.embed_dim=32"], "model.embed_dim, .*, seed: cannot change"),
    ],
)  # fmt: skip
def test_a_resume_that_changes_what_must_stay_is_refused_naming_the_keys(
    run_dir, synthetic_root, changes, keys
):
    cfg = config(synthetic_root, run_dir, *COMMON, "trainer.max_steps=4", *changes)
    with pytest.raises(ConfigError, match=rf"^{keys}") as error:
        run_training(cfg)
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000002.pt"]


@pytest.mark.slow
def test_the_cli_refuses_in_one_line_and_keeps_the_run(run_dir, synthetic_root, monkeypatch, capsys):
    argv = [*data_overrides(synthetic_root), *SMALL_MODEL, *COMMON, f"run_dir={run_dir}", "loss=siglip"]
    monkeypatch.setattr(sys, "argv", ["vlmtrain-train", *argv])
    with pytest.raises(SystemExit) as exit_, restored_logging():
        cli.train()
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: loss, "), lines
    assert (run_dir / "checkpoints" / "step_00000002.pt").exists()


@pytest.mark.slow
def test_changes_meant_to_apply_are_applied_and_every_launch_is_kept(run_dir, synthetic_root, caplog):
    caplog.set_level("INFO", logger="vlmtrain")
    run_training(config(synthetic_root, run_dir, *COMMON, "trainer.max_steps=4", "trainer.log_every=2"))
    assert "resuming with " in caplog.text and "trainer.max_steps 2 -> 4" in caplog.text
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2, 4]
    launches = sorted((run_dir / "configs").iterdir())
    assert [p.name for p in launches] == ["000.yaml", "001.yaml"]
    assert [yaml.safe_load(p.read_text())["trainer"]["max_steps"] for p in launches] == [2, 4]
    assert "resumed from step_00000002.pt" in launches[1].read_text()


@pytest.mark.slow
def test_metrics_after_a_crash_and_resume_hold_each_step_once(run_dir, synthetic_root):
    """A crash after step 3 (checkpoint at 2): steps 3.. are trained and logged again, not twice."""
    cfg = config(synthetic_root, run_dir, *COMMON, "trainer.max_steps=4")
    run_training(cfg)
    (run_dir / "checkpoints" / "step_00000004.pt").unlink()
    (run_dir / "checkpoints" / "latest").write_text("step_00000002.pt")
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 1.')  # half a line, as a kill leaves it
    run_training(cfg)
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2, 3, 4]
