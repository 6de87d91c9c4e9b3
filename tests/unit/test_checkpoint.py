import torch

from vlmtrain.checkpoint.manager import CheckpointManager


def test_save_latest_and_keep_last(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        manager.save(step, {"step": step, "w": torch.full((2,), float(step))})
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000020.pt", "step_00000030.pt"]
    assert manager.latest().name == "step_00000030.pt"
    assert manager.load()["step"] == 30


def test_half_written_file_is_never_taken_as_latest(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(5, {"step": 5})
    (tmp_path / ".step_00000010.pt.tmp123").write_bytes(b"partial")  # a crash mid-write leaves only this
    assert manager.load()["step"] == 5


def test_latest_pointer_to_a_missing_file_falls_back_to_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(1, {"step": 1})
    manager.save(2, {"step": 2})
    (tmp_path / "latest").write_text("step_00000099.pt")
    assert manager.load()["step"] == 2


def test_empty_directory_has_no_checkpoint(tmp_path):
    assert CheckpointManager(tmp_path / "none").load() is None
