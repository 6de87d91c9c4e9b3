"""Sharded checkpoints on real gloo process groups: what 2 ranks save, 2 fresh ranks load exactly, and 1
and 4 ranks load resharded to the same full weights and optimizer state; the step folder appears only
once complete; a crafted metadata pickle or value is refused without running."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from tests.helpers.ranks import fork_ranks
from tests.integration.test_fsdp import batch, build_model
from vlmtrain.checkpoint.errors import UnsafeCheckpoint
from vlmtrain.checkpoint.kinds import step_folders, sweep
from vlmtrain.checkpoint.manager import resume_candidates
from vlmtrain.checkpoint.sharded import load_sharded, read_metadata, save_sharded
from vlmtrain.distributed.sharding import full_value, shard_model
from vlmtrain.losses import ClipLoss


def newest(directory: Path) -> Path:
    """The checkpoint a resume, eval or export starts from."""
    return resume_candidates(directory, sharded=True)[0]


def _sharded() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = shard_model(build_model("clip"), mixed_precision=False)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def _full(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and AdamW moment, full (gathered from the ranks), by name."""
    names = {p: name for name, p in model.named_parameters()}
    out = {name: full_value(p).detach().clone() for p, name in names.items()}
    for param, state in optimizer.state.items():
        out |= {f"{names[param]}:{k}": full_value(v).clone() for k, v in state.items()}
    return out


def _save(rank: int, world: int, run_dir: str) -> dict:
    model, optimizer = _sharded()
    for _ in range(2):
        optimizer.zero_grad()
        ClipLoss()(**model(*batch(rank))).backward()
        optimizer.step()
    folder = save_sharded(run_dir, 2, model=model, optimizer=optimizer, extra={"train": {"step": 2}})
    return {"full": _full(model, optimizer), "folder": str(folder), "listing": sorted(os.listdir(run_dir))}


def _load(rank: int, world: int, folder: str) -> dict:
    model, optimizer = _sharded()
    extra = load_sharded(folder, model=model, optimizer=optimizer, extra={"train": {"step": 0}})
    return {"full": _full(model, optimizer), "extra": extra}


@pytest.mark.slow
def test_save_at_two_ranks_then_load_at_two_one_and_four(tmp_path: Path) -> None:
    for sub in ("save", "load2", "load1", "load4"):
        (tmp_path / sub).mkdir()
    saved = fork_ranks(_save, 2, tmp_path / "save", str(tmp_path / "run"))
    folder = saved[0]["folder"]
    assert saved[0]["listing"] == ["latest", "step_00000002"]  # no temporary folder left, the step in place
    assert newest(tmp_path / "run") == Path(folder)
    assert (Path(folder) / ".metadata").is_file()
    expected = saved[0]["full"]
    assert len(expected) == 4 * len(list(build_model("clip").parameters()))  # weight, step, 2 moments
    for world in (2, 1, 4):
        loaded = fork_ranks(_load, world, tmp_path / f"load{world}", folder)
        for result in loaded:
            assert result["extra"] == {"train": {"step": 2}}
            assert result["full"].keys() == expected.keys()
            for key, value in expected.items():
                torch.testing.assert_close(result["full"][key], value, rtol=0, atol=0, msg=key)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_metadata_is_refused_without_running(tmp_path: Path) -> None:
    folder, marker = tmp_path / "step_1", tmp_path / "ran"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(UnsafeCheckpoint) as refused:
        load_sharded(folder, model=model, optimizer=optimizer)
    assert "refused: its metadata would build io.open" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert not marker.exists()
    FileSystemReader(folder).read_metadata().close()  # the format's own reader runs the payload
    assert marker.exists()
    (folder / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(UnsafeCheckpoint, match="not a sharded checkpoint"):
        read_metadata(folder / ".metadata")


def test_crafted_value_is_refused_without_running(tmp_path: Path) -> None:
    """The format unpickles its non-tensor values freely; ours are read as plain values only."""
    marker = tmp_path / "ran"
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    extra = {"train": {"step": _Payload(marker)}}
    folder = save_sharded(tmp_path / "run", 1, model=model, optimizer=optimizer, extra=extra)
    with pytest.raises(UnsafeCheckpoint, match=r"step_00000001: train\.step: refused: not a plain value$"):
        load_sharded(folder, model=model, optimizer=optimizer, extra={"train": {"step": 0}})
    assert not marker.exists()


def test_partial_writes_are_swept_and_not_listed(tmp_path: Path) -> None:
    for name in ("step_3", "step_10", "step_11", ".step_12.tmp", ".step_3.old"):
        (tmp_path / name).mkdir()
    for name in ("step_3", "step_10", ".step_12.tmp"):
        (tmp_path / name / ".metadata").touch()
    assert [p.name for p in step_folders(tmp_path)] == ["step_3", "step_10"]  # step_11: no metadata yet
    sweep(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["step_10", "step_11", "step_3"]


def test_latest_moves_and_old_steps_go(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3):
        save_sharded(tmp_path, step, model=model, optimizer=optimizer, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000002", "step_00000003"]
    assert newest(tmp_path) == tmp_path / "step_00000003"
    (tmp_path / "latest").write_text("step_00000002")
    assert newest(tmp_path) == tmp_path / "step_00000002"
    (tmp_path / "latest").write_text("../elsewhere")
    assert newest(tmp_path) == tmp_path / "step_00000003"
