"""The checkpoint manager: every part it is handed saved together at due steps, restored together, the
newest k kept, half-written files never taken, and loading never runs code."""

import os

import pytest
import torch
from torch import nn

from vlmtrain.checkpoint.manager import (
    CheckpointManager,
    UnsafeCheckpoint,
    latest_checkpoint,
    read_checkpoint,
)
from vlmtrain.checkpoint.policy import config_changes, resumed_batch
from vlmtrain.schema import ConfigError
from vlmtrain.train.state import RNGState, TrainState


class Counter:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def manager(directory, every=10, keep_last=2, **parts):
    return CheckpointManager(directory, parts or {"counter": Counter()}, every=every, keep_last=keep_last)


def test_saves_only_due_steps_and_the_last_one(tmp_path):
    checkpoints = manager(tmp_path, every=10)
    saved = [step for step in range(1, 26) if checkpoints.save(step)]
    assert saved == [10, 20]
    assert checkpoints.save(25, last=True).name == "step_00000025.pt"
    assert checkpoints.save(25, last=True) is None  # already written
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000020.pt", "step_00000025.pt"]
    assert latest_checkpoint(tmp_path).name == "step_00000025.pt"


def test_every_part_is_saved_and_restored_together(tmp_path):
    model, state = nn.Linear(3, 2), TrainState(step=4, samples_seen=64)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    parts = {
        "model": model,
        "optimizer": optimizer,
        "train_state": state,
        "data": Counter(3),
        "rng": RNGState(),
    }
    CheckpointManager(tmp_path, parts, every=4, extra={"config": {"seed": 1}}).save(4)
    expected_noise = torch.rand(3)

    model2, state2, data2 = nn.Linear(3, 2), TrainState(), Counter()
    optimizer2 = torch.optim.AdamW(model2.parameters())
    parts2 = {
        "model": model2,
        "optimizer": optimizer2,
        "train_state": state2,
        "data": data2,
        "rng": RNGState(),
    }
    assert CheckpointManager(tmp_path, parts2, every=4).resume().name == "step_00000004.pt"
    assert torch.equal(model2.weight, model.weight) and state2 == state and data2.value == 3
    assert torch.equal(
        optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert torch.equal(torch.rand(3), expected_noise)  # the RNG continues where the saved run was
    assert read_checkpoint(tmp_path / "step_00000004.pt")["config"] == {"seed": 1}


def test_other_ranks_restore_but_never_write(tmp_path):
    manager(tmp_path / "a", every=1).save(1)
    reader = CheckpointManager(tmp_path / "a", {"counter": Counter()}, every=1, writer=False)
    assert reader.resume() is not None and reader.save(2) is None
    assert latest_checkpoint(tmp_path / "a").name == "step_00000001.pt"


def test_half_written_file_is_never_taken_as_latest(tmp_path):
    counter = Counter(5)
    CheckpointManager(tmp_path, {"counter": counter}, every=5).save(5)
    (tmp_path / ".step_00000010.pt.tmp123").write_bytes(b"partial")  # a crash mid-write leaves only this
    fresh = Counter()
    assert CheckpointManager(tmp_path, {"counter": fresh}, every=5).resume().name == "step_00000005.pt"
    assert fresh.value == 5


def test_latest_pointer_to_a_missing_file_falls_back_to_newest(tmp_path):
    checkpoints = manager(tmp_path, every=1, keep_last=3)
    checkpoints.save(1)
    checkpoints.save(2)
    (tmp_path / "latest").write_text("step_00000099.pt")
    assert latest_checkpoint(tmp_path).name == "step_00000002.pt"


def test_empty_directory_is_a_fresh_run(tmp_path):
    assert manager(tmp_path / "none").resume() is None


def test_a_checkpoint_of_something_else_is_refused(tmp_path):
    manager(tmp_path, every=1, counter=Counter()).save(1)
    with pytest.raises(ValueError, match="not a checkpoint of this run .no model"):
        CheckpointManager(tmp_path, {"model": nn.Linear(2, 2)}, every=1).resume()


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_a_crafted_checkpoint_runs_no_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    torch.save({"counter": RunsCode()}, tmp_path / "checkpoints" / "step_00000001.pt")
    with pytest.raises(UnsafeCheckpoint, match=r"step_00000001.pt: refused: .*could run code$") as error:
        manager(tmp_path / "checkpoints").resume()
    assert "\n" not in str(error.value)
    assert not (tmp_path / "pwned").exists()


def test_data_workers_and_world_size_may_change_on_resume_zero_and_one_workers_alike():
    saved = {"data": {"num_workers": 0, "batch_size": 8}, "world_size": 2}
    assert config_changes(saved, {"data": {"num_workers": 1, "batch_size": 8}, "world_size": 2}) == ([], [])
    changed = {"data": {"num_workers": 3, "batch_size": 16}, "world_size": 1}
    assert config_changes(saved, changed) == ([], ["data.batch_size", "data.num_workers", "world_size"])
    other_buffer = {"data": {"num_workers": 0, "batch_size": 8, "shuffle_buffer": 5}, "world_size": 2}
    assert config_changes(saved, other_buffer) == (["data.shuffle_buffer"], [])


def _launch(batch: int, ranks: int, micro: int = 1) -> dict:
    return {"data": {"batch_size": batch}, "trainer": {"micro_batches": micro}, "world_size": ranks}


@pytest.mark.parametrize(
    "saved,new,expected",
    [
        ((8, 2), (8, 2), (8, 1)),  # nothing changed
        ((8, 2), (8, 1), (16, 2)),  # fewer ranks: a larger per-rank batch, in micro-batches of the 8 launched
        ((8, 2, 2), (8, 1, 2), (16, 4)),  # ... in micro-batches no larger than the 4 launched with
        ((8, 2, 2), (8, 4, 2), (4, 1)),  # more ranks: a smaller one, micro-batches of 4 still fit
        ((6, 2, 3), (6, 4, 3), (3, 3)),  # micro-batches of at most 2 in a batch of 3: 3 of 1
        ((8, 2), (16, 1), (16, 1)),  # the user kept the global batch: as launched
        ((12, 1, 4), (12, 3, 4), (4, 2)),
    ],
)
def test_a_resume_on_another_world_size_keeps_the_global_batch(saved, new, expected):
    assert resumed_batch(_launch(*saved), _launch(*new)) == expected


@pytest.mark.parametrize(
    "saved,new,message",
    [
        ((8, 2), (8, 3), "data.batch_size: the checkpoint's global batch 16 (8 per rank x 2 rank(s)) does not "
         "divide over 3 ranks; resume on a world size that divides 16, or start a new run_dir"),
        ((8, 2), (4, 1), "data.batch_size: 4 per rank x 1 rank(s) is a global batch of 4, the checkpoint's is "
         "16 (8 x 2); the global batch cannot change when resuming: restore it (data.batch_size=16) or "
         "start a new run_dir"),
        ((8, 1), (16, 1), "data.batch_size: 16 per rank x 1 rank(s) is a global batch of 16, the "),
    ],
)  # fmt: skip
def test_a_global_batch_that_cannot_be_kept_is_refused_in_one_line_naming_both(saved, new, message):
    with pytest.raises(ConfigError) as error:
        resumed_batch(_launch(*saved), _launch(*new))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_model_fields_that_keep_the_result_are_applied_on_resume_even_when_the_checkpoint_lacks_them():
    saved = {"model": {"text_encoder": {"width": 64, "grad_checkpointing": False}}}
    new = {"model": {"text_encoder": {"width": 64, "grad_checkpointing": True, "trim_padding": True}}}
    applied = ["model.text_encoder.grad_checkpointing", "model.text_encoder.trim_padding"]
    assert config_changes(saved, new) == ([], applied)
    wider = {"model": {"text_encoder": {"width": 128, "grad_checkpointing": False}}}
    assert config_changes(saved, wider) == (["model.text_encoder.width"], [])
