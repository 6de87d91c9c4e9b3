"""A run's checkpoints of both kinds in one folder (ddp's step files, fsdp's step folders), in one process:
the optimizer state mapped from index keys to name keys and back exactly (a state that does not map is one
line), the newest step of either kind resumed and `keep_last` counted over both, each manager resuming
from the other's checkpoint and passing over an unreadable one, the resume's checks seeing the other
kind's run state before anything loads, and a crafted folder refused under ddp."""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from tests.helpers.compare import bit_equal
from tests.unit.test_sharded_manager import Run
from vlmtrain.checkpoint.errors import UnsafeCheckpoint
from vlmtrain.checkpoint.kinds import by_index, by_name, optimizer_shaped, parameter_names, prune
from vlmtrain.checkpoint.manager import CheckpointManager, resume_candidates
from vlmtrain.checkpoint.sharded_manager import ShardedCheckpointManager
from vlmtrain.schema import ConfigError
from vlmtrain.train.optim import adamw


class Towers(nn.Module):
    """Parameters whose optimizer groups (decay, no decay) list them in another order than the model."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.blocks = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 2)])
        self.extra = nn.Parameter(torch.ones(2, 2)) if extra else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x * self.logit_scale


def trained(model: nn.Module) -> torch.optim.Optimizer:
    optimizer = adamw(model, lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.ones(2, 3)).square().sum().backward()
        optimizer.step()
    return optimizer


def test_optimizer_state_maps_from_index_keys_to_name_keys_and_back_exactly():
    torch.manual_seed(0)
    model = Towers()
    optimizer = trained(model)
    groups = parameter_names(model, optimizer)
    assert groups == [
        ["blocks.0.weight", "blocks.1.weight"],
        ["logit_scale", "blocks.0.bias", "blocks.1.bias"],
    ]
    indexed = optimizer.state_dict()
    named = by_name(indexed, groups, "step_2.pt")
    own = get_optimizer_state_dict(model, optimizer)  # torch.distributed.checkpoint's names
    assert bit_equal(named["state"], own["state"])
    assert [g["params"] for g in named["param_groups"]] == [g["params"] for g in own["param_groups"]]
    assert bit_equal(by_index(named, groups, "step_2"), indexed)
    assert bit_equal(by_name(by_index(named, groups, "step_2"), groups, "step_2.pt"), named)


def test_a_state_that_does_not_map_onto_the_parameters_is_refused_in_one_line():
    model, larger = Towers(), Towers(extra=True)
    optimizer = trained(model)
    indexed, mine = optimizer.state_dict(), parameter_names(model, optimizer)
    named, groups = by_name(indexed, mine, "a"), parameter_names(larger, adamw(larger))
    shapes = {name: param.shape for name, param in model.named_parameters()}
    cases = [
        (lambda: by_name(indexed, groups, "step_2.pt"), r"group 0 holds 2 parameter\(s\) saved, 3 now"),
        (lambda: by_index(named, groups, "step_2"), r"group 0: extra is not in both the checkpoint and"),
        (lambda: by_name(indexed, groups[:1], "step_2.pt"), r"2 parameter group\(s\) saved, 1 now"),
        (lambda: by_index(named | {"state": {"gone": {}}}, mine, "step_2"), r"state for 'gone', not a param"),
        (lambda: optimizer_shaped(by_name(indexed, [mine[0][::-1], mine[1]], "a"), shapes, "step_2.pt"),
         r"blocks.1.weight: its exp_avg holds 9 values, its parameter 6"),  # mapped in another order
    ]  # fmt: skip
    for call, reason in cases:
        with pytest.raises(ConfigError, match=reason) as refused:
            call()
        assert "\n" not in str(refused.value) and "resume with the model and optimizer" in str(refused.value)


def checkpoints(directory: Path, files: list[int], folders: list[int]) -> None:
    directory.mkdir(exist_ok=True)
    for step in files:
        (directory / f"step_{step:08d}.pt").write_bytes(b"PK")
    for step in folders:
        (directory / f"step_{step:08d}").mkdir()
        (directory / f"step_{step:08d}" / ".metadata").touch()


def test_the_newest_step_of_either_kind_comes_first_and_keep_last_counts_both(tmp_path):
    names = lambda directory, sharded: [p.name for p in resume_candidates(directory, sharded)]  # noqa: E731
    checkpoints(tmp_path / "a", files=[40], folders=[60])
    checkpoints(tmp_path / "b", files=[60], folders=[40])
    for sharded in (False, True):
        assert names(tmp_path / "a", sharded) == ["step_00000060", "step_00000040.pt"]
        assert names(tmp_path / "b", sharded) == ["step_00000060.pt", "step_00000040"]
    (tmp_path / "a" / "latest").write_text("step_00000040.pt")
    assert names(tmp_path / "a", True) == ["step_00000040.pt", "step_00000060"]
    checkpoints(tmp_path / "c", files=[10, 20], folders=[20, 30])
    assert names(tmp_path / "c", True)[1:3] == ["step_00000020", "step_00000020.pt"]  # its own kind first
    assert names(tmp_path / "c", False)[1:3] == ["step_00000020.pt", "step_00000020"]
    prune(tmp_path / "c", 2)
    assert sorted(os.listdir(tmp_path / "c")) == ["step_00000020", "step_00000030"]


def test_each_kind_resumes_from_the_other_and_passes_over_an_unreadable_one(tmp_path, caplog):
    run, saved = Run(), {}
    plain = CheckpointManager(tmp_path, run.parts(), every=1, keep_last=0, extra={"config": {}})
    sharded = ShardedCheckpointManager(tmp_path, run.parts(), every=1, keep_last=0, extra={"config": {}})
    for step, manager in ((1, plain), (2, sharded), (3, plain), (4, sharded)):
        run.advance()
        manager.save(step)
        saved[step] = run.weights(), copy.deepcopy(run.optimizer.state_dict())  # the live state moves on
    shard, file = tmp_path / "step_00000004" / "__0_0.distcp", tmp_path / "step_00000003.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    resumed(ShardedCheckpointManager, tmp_path, saved, expected=3)  # a folder unreadable: the file before
    assert f"{shard.parent} cannot be read" in caplog.text
    file.write_bytes(file.read_bytes()[:100])
    resumed(CheckpointManager, tmp_path, saved, expected=2)  # a file unreadable: the folder before
    assert f"{file} cannot be read" in caplog.text
    assert sorted(os.listdir(tmp_path))[-3:] == [
        "step_00000002",
        "step_00000003.pt.unreadable",
        "step_00000004.unreadable",
    ]


def resumed(kind: type, directory: Path, saved: dict, expected: int) -> None:
    """`kind` resumes the run in `directory` from step `expected`, every part as it was saved."""
    restored = Run()
    path = kind(directory, restored.parts(), every=1).resume()
    assert path.name.startswith(f"step_{expected:08d}") and restored.state.step == expected, kind
    assert bit_equal(restored.weights(), saved[expected][0])
    assert bit_equal(restored.optimizer.state_dict(), saved[expected][1])


def test_a_resume_from_the_other_kind_is_checked_before_anything_loads(tmp_path):
    def refuse(path: Path, saved: dict) -> None:
        seen.append((path.name, saved["config"], saved["train_state"]["step"]))
        raise ConfigError("optim.lr: cannot change when resuming")

    run = Run()
    run.advance()
    ShardedCheckpointManager(tmp_path / "fsdp", run.parts(), every=1, extra={"config": {"seed": 1}}).save(1)
    CheckpointManager(tmp_path / "ddp", run.parts(), every=1, extra={"config": {"seed": 1}}).save(1)
    seen: list = []
    for kind, directory in ((CheckpointManager, "fsdp"), (ShardedCheckpointManager, "ddp")):
        fresh = Run()
        before = fresh.weights()
        with pytest.raises(ConfigError, match="optim.lr"):
            kind(tmp_path / directory, fresh.parts(), every=1).resume(check=refuse)
        assert bit_equal(fresh.weights(), before) and fresh.state.step == 0 and not fresh.optimizer.state
    assert seen == [("step_00000001", {"seed": 1}, 1), ("step_00000001.pt", {"seed": 1}, 1)]


def test_a_ddp_resume_refuses_a_crafted_metadata_file_in_a_step_folder(tmp_path):
    from tests.integration.test_sharded_checkpoint import _Payload

    run, marker = Run(), tmp_path / "ran"
    CheckpointManager(tmp_path / "run", run.parts(), every=1).save(1)
    folder = tmp_path / "run" / "step_00000002"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (folder.parent / "latest").write_text(folder.name)  # as a sharded run resumed from step 1 names it
    with pytest.raises(UnsafeCheckpoint) as refused:
        CheckpointManager(tmp_path / "run", Run().parts(), every=1).resume()
    assert str(refused.value) == (
        f"{folder / '.metadata'}: refused: its metadata would build io.open, not only checkpoint metadata, "
        "and loading it could run code"
    )
    assert not marker.exists() and folder.exists()
