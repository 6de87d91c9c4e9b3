"""The sharded runs' checkpoint manager in one process (no process group): every part restored from the
newest folder that reads, a truncated shard set aside for the previous folder, a failed write as one line
naming the intact folder, and background writes that land whole (resuming from a ddp run's step files:
test_checkpoint_kinds.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from vlmtrain.checkpoint.errors import CheckpointWriteError
from vlmtrain.checkpoint.sharded_manager import ShardedCheckpointManager
from vlmtrain.train.state import TrainState


class Run:
    """A model, its optimizer and a counter, as a run's parts; `advance()` is one training step."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 3)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.state = TrainState()

    def parts(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "train_state": self.state}

    def advance(self) -> None:
        self.optimizer.zero_grad()
        self.model(torch.ones(2, 4)).square().sum().backward()
        self.optimizer.step()
        self.state.step += 1

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.model.state_dict().items()}


def manager(directory: Path, run: Run, **options: object) -> ShardedCheckpointManager:
    return ShardedCheckpointManager(directory, run.parts(), every=1, extra={"config": {"seed": 0}}, **options)


def test_resume_restores_every_part_and_passes_over_a_truncated_shard(tmp_path, caplog):
    run, weights = Run(), {}
    checkpoints = manager(tmp_path, run)
    for _ in range(3):
        run.advance()
        checkpoints.save(run.state.step)
        weights[run.state.step] = run.weights()
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000002", "step_00000003"]
    shard = tmp_path / "step_00000003" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    restored = Run()
    seen = []
    folder = manager(tmp_path, restored).resume(check=lambda path, saved: seen.append(saved["config"]))
    assert folder == tmp_path / "step_00000002" and seen == [{"seed": 0}, {"seed": 0}]
    assert restored.state.step == 2 and restored.optimizer.state_dict()["state"][0]["step"] == 2
    for key, value in weights[2].items():
        assert torch.equal(restored.weights()[key], value), key
    assert "step_00000003 cannot be read" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000002", "step_00000003.unreadable"]


def test_a_failed_write_is_one_line_naming_the_intact_folder(tmp_path, monkeypatch):
    run = Run()
    checkpoints = manager(tmp_path, run)
    run.advance()
    checkpoints.save(1)

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    run.advance()
    with pytest.raises(CheckpointWriteError) as failed:
        checkpoints.save(2)
    intact = tmp_path / "step_00000001"
    assert (
        str(failed.value) == f"checkpoint of step 2 not written (No space left on device); {intact} is intact"
    )
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000001"]  # no temporary folder left


def test_background_writes_land_whole_and_resume_like_synchronous_ones(tmp_path):
    saved = {}
    for mode in ("sync", "async"):
        run = Run()
        checkpoints = manager(tmp_path / mode, run, asynchronous=mode == "async")
        for step in (1, 2, 3):
            run.advance()
            checkpoints.save(step, last=step == 3)
        checkpoints.close()
        assert sorted(os.listdir(tmp_path / mode)) == ["latest", "step_00000002", "step_00000003"]
        restored = Run()
        assert manager(tmp_path / mode, restored).resume() == tmp_path / mode / "step_00000003"
        saved[mode] = restored.weights(), restored.optimizer.state_dict()["state"][0]
    for key, value in saved["sync"][0].items():
        assert torch.equal(saved["async"][0][key], value), key
    for key, value in saved["sync"][1].items():
        assert torch.equal(saved["async"][1][key], value), key
