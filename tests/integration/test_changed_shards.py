"""A resume checks the data it continues: shards replaced at the same paths, or a shard gone from a
folder spec, are refused in one line naming the shard, unless data.allow_changed_shards=true."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.runs import config, read_metrics, run_training
from vlmtrain.schema import ConfigError

pytestmark = pytest.mark.slow
COMMON = [
    "trainer.log_every=1",
    "trainer.checkpoint_every=2",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.val_shards=null",
    "data.zeroshot_dir=null",
]


@pytest.fixture(scope="module")
def trained_once(synthetic_root, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A 2-step run on a copy of the synthetic shards (a folder spec), trained once for the module, and a
    copy of both kept apart; the shards, the run, its overrides."""
    base = tmp_path_factory.mktemp("changed")
    shards = base / "shards"
    shutil.copytree(synthetic_root / "train", shards)
    overrides = [*COMMON, f"data.train_shards={shards}"]
    run_training(config(synthetic_root, base / "run", *overrides, "trainer.max_steps=2"))
    for folder in ("shards", "run"):
        shutil.copytree(base / folder, base / "kept" / folder)
    return shards, base / "run", overrides


@pytest.fixture
def trained(trained_once) -> tuple[Path, Path, list[str]]:
    """The shards and the 2-step run, as trained, at the paths they were trained with."""
    shards, run_dir, _ = trained_once
    for folder in (shards, run_dir):
        shutil.rmtree(folder)
        shutil.copytree(folder.parent / "kept" / folder.name, folder)
    return trained_once


def _resume(synthetic_root: Path, run_dir: Path, overrides: list[str], *more: str) -> None:
    run_training(config(synthetic_root, run_dir, *overrides, "trainer.max_steps=4", *more))


def _swap(a: Path, b: Path) -> None:
    """Two shards trade contents: each path now holds other images (of the same size here)."""
    data_a = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data_a)


def test_shards_replaced_at_the_same_paths_are_refused(synthetic_root, trained):
    shards, run_dir, overrides = trained
    _swap(shards / "000000.tar", shards / "000001.tar")
    with pytest.raises(ConfigError) as refused:
        _resume(synthetic_root, run_dir, overrides)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        f"data: the shards changed since step_00000002.pt (data.train_shards: {shards / '000000.tar'} changed"
    ), message
    assert "data.allow_changed_shards=true" in message
    assert [row["step"] for row in read_metrics(run_dir) if "loss" in row] == [1, 2]  # nothing trained


def test_a_shard_gone_from_a_folder_is_refused(synthetic_root, trained):
    shards, run_dir, overrides = trained
    (shards / "000002.tar").unlink()
    with pytest.raises(ConfigError, match=r"000002\.tar is gone \(3 shards then, 2 now\)"):
        _resume(synthetic_root, run_dir, overrides)


def test_allow_changed_shards_resumes_and_logs_what_changed(synthetic_root, trained, caplog):
    shards, run_dir, overrides = trained
    _swap(shards / "000000.tar", shards / "000001.tar")
    with caplog.at_level("WARNING", logger="vlmtrain"):
        _resume(synthetic_root, run_dir, overrides, "data.allow_changed_shards=true")
    assert (
        f"resuming on changed shards (data.allow_changed_shards): data.train_shards: {shards / '000000.tar'}"
        in caplog.text
    )
    assert [row["step"] for row in read_metrics(run_dir) if "loss" in row] == [1, 2, 3, 4]


def test_unchanged_shards_resume_quietly(synthetic_root, trained, caplog):
    shards, run_dir, overrides = trained
    with caplog.at_level("WARNING", logger="vlmtrain"):
        _resume(synthetic_root, run_dir, overrides)
    assert "changed shards" not in caplog.text
    assert [row["step"] for row in read_metrics(run_dir) if "loss" in row] == [1, 2, 3, 4]
