"""Checkpoint writes under faults: a failed write (full disk) leaves no partial file and names the
checkpoint still intact, a killed writer's temporary files are swept on the next start, and a
truncated newest checkpoint is set aside for the newest one that loads."""

import errno
import multiprocessing
import random
import time

import pytest
import torch

from vlmtrain.checkpoint import manager as manager_module
from vlmtrain.checkpoint.manager import CheckpointManager, CheckpointWriteError, latest_checkpoint


class Blob:
    """A part whose checkpoint holds a tensor filled with its step, so a loaded file tells its step."""

    def __init__(self, numel: int = 16) -> None:
        self.value, self.numel = 0, numel

    def state_dict(self) -> dict:
        return {"value": self.value, "data": torch.full((self.numel,), float(self.value))}

    def load_state_dict(self, state: dict) -> None:
        assert torch.equal(state["data"], torch.full((self.numel,), float(state["value"])))
        self.value = state["value"]


def manager(directory, blob=None, keep_last=2) -> CheckpointManager:
    return CheckpointManager(directory, {"blob": blob or Blob()}, every=1, keep_last=keep_last)


def temps(directory) -> list:
    return sorted(p.name for p in directory.glob(".*tmp*"))


def test_a_full_disk_removes_the_partial_file_and_names_the_intact_checkpoint(tmp_path, monkeypatch):
    blob = Blob()
    checkpoints = manager(tmp_path, blob)
    blob.value = 1
    checkpoints.save(1)

    def full_disk(state, handle):  # half of the file gets written, then the disk is full
        handle.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manager_module.torch, "save", full_disk)
    blob.value = 2
    with pytest.raises(CheckpointWriteError) as error:
        checkpoints.save(2)
    assert str(error.value) == (
        f"checkpoint of step 2 not written (No space left on device); {tmp_path / 'step_00000001.pt'} is intact"
    )
    assert temps(tmp_path) == [] and latest_checkpoint(tmp_path).name == "step_00000001.pt"
    monkeypatch.undo()
    restored = Blob()
    assert manager(tmp_path, restored).resume().name == "step_00000001.pt" and restored.value == 1


def test_stale_temporary_files_are_swept_when_a_run_starts(tmp_path):
    manager(tmp_path).save(1)
    (tmp_path / ".step_00000002.pt.tmp4242").write_bytes(b"partial")
    (tmp_path / ".latest.tmp4242").write_bytes(b"step_00000002.pt")
    reader = CheckpointManager(tmp_path, {"blob": Blob()}, every=1, writer=False)
    reader.resume()
    assert len(temps(tmp_path)) == 2  # ranks other than 0 never delete
    assert manager(tmp_path).resume().name == "step_00000001.pt"
    assert temps(tmp_path) == []


def test_a_truncated_latest_checkpoint_falls_back_to_the_newest_that_loads(tmp_path, caplog):
    blob = Blob()
    checkpoints = manager(tmp_path, blob, keep_last=3)
    for step in (1, 2, 3):
        blob.value = step
        checkpoints.save(step)
    newest = tmp_path / "step_00000003.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size * 7 // 10])  # cut at 70%
    restored = Blob()
    assert manager(tmp_path, restored).resume().name == "step_00000002.pt" and restored.value == 2
    assert "step_00000003.pt cannot be read" in caplog.text
    assert (tmp_path / "step_00000003.pt.unreadable").exists() and not newest.exists()


def _save_forever(directory: str) -> None:
    torch.set_num_threads(1)  # a forked child must not touch the parent's thread pool
    blob = Blob(numel=2_000_000)  # 8 MB: most of the loop's time is spent writing
    checkpoints = manager(directory, blob)
    while True:
        blob.value += 1
        checkpoints.save(blob.value)


@pytest.mark.slow
def test_killed_during_writes_ten_times_resumes_the_previous_checkpoint(tmp_path):
    """SIGKILL at random points of a save loop; each time the next start loads a complete checkpoint,
    sweeps the temporary file, and writes the next one."""
    rng, left_behind = random.Random(0), 0
    for attempt in range(10):
        directory = tmp_path / str(attempt)
        writer = multiprocessing.get_context("fork").Process(target=_save_forever, args=(str(directory),))
        writer.start()
        deadline = time.monotonic() + 60
        while latest_checkpoint(directory) is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        writer.kill()
        writer.join()
        left_behind += bool(temps(directory))
        restored = Blob(numel=2_000_000)
        rerun = manager(directory, restored)
        path = rerun.resume()
        assert path is not None and int(path.stem.split("_")[1]) == restored.value > 0
        assert temps(directory) == []
        restored.value += 1
        rerun.save(restored.value)
        assert temps(directory) == [] and latest_checkpoint(directory).name == f"step_{restored.value:08d}.pt"
    assert left_behind >= 3  # the kills did land during writes


def test_a_data_worker_dying_during_a_save_is_not_reported_as_a_failed_write(tmp_path, monkeypatch):
    checkpoints = manager(tmp_path)
    checkpoints.save(1)

    def worker_dies(state, handle):  # torch's SIGCHLD handler raises in whatever the main process runs
        handle.write(b"x" * 1000)
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

    monkeypatch.setattr(manager_module.torch, "save", worker_dies)
    with pytest.raises(RuntimeError, match="DataLoader worker") as error:
        checkpoints.save(2)
    assert not isinstance(error.value, CheckpointWriteError)
    assert temps(tmp_path) == [] and latest_checkpoint(tmp_path).name == "step_00000001.pt"

    def zip_writer_fails(state, handle):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1472 vs 1366")

    monkeypatch.setattr(manager_module.torch, "save", zip_writer_fails)
    with pytest.raises(CheckpointWriteError, match="checkpoint of step 2 not written"):
        checkpoints.save(2)
