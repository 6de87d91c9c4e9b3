"""Short real training runs on CPU: the model learns, and a resumed run equals an uninterrupted one."""

import shutil

import pytest
import torch

from tests.helpers.runs import config, read_metrics, run_training
from vlmtrain.config_tree import typed_config
from vlmtrain.report.plots import PLOT_FILE
from vlmtrain.train.trainer import Trainer


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_run_bit_for_bit(synthetic_root, tmp_path):
    common = [
        "trainer.max_steps=12",
        "trainer.checkpoint_every=8",
        "trainer.log_every=1",
        "data.batch_size=16",
        "data.num_workers=2",
        "data.val_shards=null",
        "data.zeroshot_dir=null",
        "trainer.keep_checkpoints=5",
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_training(config(synthetic_root, full, *common))

    # A crash after step 8's checkpoint: the run directory holds only that checkpoint and its metrics.
    resumed.mkdir()
    shutil.copytree(full / "checkpoints", resumed / "checkpoints")
    (resumed / "checkpoints" / "step_00000012.pt").unlink()
    (resumed / "checkpoints" / "latest").write_text("step_00000008.pt")
    run_training(config(synthetic_root, resumed, *common))

    assert [row["step"] for row in read_metrics(resumed)] == list(range(9, 13))
    a = torch.load(full / "checkpoints" / "step_00000012.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "step_00000012.pt", weights_only=True)
    assert a["train_state"] == b["train_state"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [row["loss"] for row in read_metrics(full)][8:] == [row["loss"] for row in read_metrics(resumed)]
    assert not (full / PLOT_FILE).exists()  # trainer.plot_curves=false (test_runs_table: one drawn)


@pytest.mark.slow
def test_run_continues_from_latest_checkpoint_when_steps_are_raised(synthetic_root, tmp_path):
    base = [
        "trainer.checkpoint_every=5",
        "data.batch_size=16",
        "data.num_workers=0",
        "data.val_shards=null",
        "data.zeroshot_dir=null",
        "trainer.log_every=5",
    ]
    run_training(config(synthetic_root, tmp_path, "trainer.max_steps=5", *base))
    run_training(config(synthetic_root, tmp_path, "trainer.max_steps=10", *base))
    assert [row["step"] for row in read_metrics(tmp_path)] == [5, 10]
    saved = torch.load(tmp_path / "checkpoints" / "step_00000010.pt", weights_only=True)
    assert saved["train_state"]["step"] == 10 and saved["config"]["trainer"]["max_steps"] == 10


@pytest.mark.slow
def test_micro_batches_train_like_the_whole_batch(synthetic_root, tmp_path):
    """trainer.micro_batches=4 keeps every negative: the same losses step for step as the whole batch."""
    common = [
        "trainer.max_steps=4",
        "trainer.log_every=1",
        "data.batch_size=16",
        "data.num_workers=1",
        "data.val_shards=null",
        "data.zeroshot_dir=null",
    ]
    run_training(config(synthetic_root, tmp_path / "whole", *common))
    run_training(config(synthetic_root, tmp_path / "micro", *common, "trainer.micro_batches=4"))
    whole, micro = (read_metrics(tmp_path / name) for name in ("whole", "micro"))
    assert [row["loss"] for row in micro] == pytest.approx([row["loss"] for row in whole], rel=1e-5)


def test_building_a_trainer_writes_nothing_and_start_resumes_visibly(synthetic_root, tmp_path):
    """Construction only builds (and takes the run's lock); `start()` resumes (a named step: `resume()`)
    and records the launch."""
    run_dir = tmp_path / "run"
    cfg = config(synthetic_root, run_dir, "trainer.max_steps=1", "data.num_workers=0")
    trainer = Trainer(typed_config(cfg))
    try:
        assert [p.name for p in run_dir.iterdir()] == ["run.lock"]
        assert trainer.resumed_from is None and not trainer.started
        assert trainer.start() is trainer and trainer.started and trainer.resumed_from is None
        assert (run_dir / "config.json").is_file() and (run_dir / "configs" / "000.yaml").is_file()
        trainer.train()
    finally:
        trainer.close()
    with Trainer(typed_config(cfg)) as again:
        assert again.resume() == run_dir / "checkpoints" / "step_00000001.pt" and again.state.step == 1
