"""The checkpoint folder is the boundary: `latest` names only a `step_N.pt` entry of it; a text file, a
FIFO, a link to /dev/zero or out of the folder is "not a checkpoint" and the newest intact step is
used, as for a truncated file; nothing outside the folder is renamed; a FIFO never blocks."""

import os
import threading

import pytest
import torch

from vlmtrain.checkpoint.load import read_source
from vlmtrain.checkpoint.manager import CheckpointManager, latest_checkpoint, read_newest


class Step:
    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value, "data": torch.full((4,), float(self.value))}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def saved_steps(folder, steps=(1, 2)) -> None:
    part = Step()
    checkpoints = CheckpointManager(folder, {"part": part}, every=1, keep_last=5)
    for step in steps:
        part.value = step
        checkpoints.save(step)


def junk(tmp_path, kind: str):
    """Steps 1 and 2 in tmp_path/run/checkpoints, then `kind` of junk as the newest; (folder, outside)."""
    folder, outside = tmp_path / "run" / "checkpoints", tmp_path / "outside" / "precious.zip"
    saved_steps(folder)
    outside.parent.mkdir()
    outside.write_bytes(b"PK\x03\x04 not yours to rename")
    newest = folder / "step_00000003.pt"
    pointer = {
        "relative_out": os.path.relpath(outside, folder),
        "absolute_out": str(outside),
        "text_pointer": "notes.txt",
    }.get(kind, newest.name)
    if kind == "text":
        newest.write_text("hello\n")
    elif kind == "text_pointer":
        (folder / "notes.txt").write_text("hello\n")
    elif kind == "fifo":
        os.mkfifo(newest)
    elif kind == "dev_zero":
        newest.symlink_to("/dev/zero")
    elif kind == "link_out":
        newest.symlink_to(outside)
    elif kind == "pointer_is_fifo":
        (folder / "latest").unlink()
        os.mkfifo(folder / "latest")
        return folder, outside
    (folder / "latest").write_text(pointer)
    return folder, outside


KINDS = (
    "text",
    "text_pointer",
    "fifo",
    "dev_zero",
    "link_out",
    "relative_out",
    "absolute_out",
    "pointer_is_fifo",
)


def within(seconds: float, call, fifos):
    """`call()` in a thread; one still blocked on a FIFO after `seconds` is released and the test fails."""
    out: dict = {}

    def target() -> None:
        try:
            out["value"] = call()
        except Exception as error:  # raised again in the test's thread
            out["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            if fifo.exists() and not fifo.is_symlink():
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
        thread.join(10)
        pytest.fail(f"still blocked after {seconds} s")
    if "error" in out:
        raise out["error"]
    return out.get("value")


@pytest.mark.parametrize("kind", KINDS)
def test_resume_passes_junk_for_the_newest_intact_step(tmp_path, kind, caplog):
    folder, outside = junk(tmp_path, kind)
    part = Step()
    fifos = [folder / "step_00000003.pt", folder / "latest"]
    resumed = within(10, lambda: CheckpointManager(folder, {"part": part}, every=1).resume(), fifos)
    assert resumed == folder / "step_00000002.pt" and part.value == 2
    assert outside.read_bytes() == b"PK\x03\x04 not yours to rename"
    assert sorted(p.name for p in outside.parent.iterdir()) == ["precious.zip"]
    assert "could run code" not in caplog.text
    if kind in ("text", "fifo", "dev_zero", "link_out"):
        assert "not a checkpoint" in caplog.text
        assert (folder / "step_00000003.pt.unreadable").is_symlink() == (kind in ("dev_zero", "link_out"))


@pytest.mark.parametrize("kind", KINDS)
def test_a_reader_passes_junk_and_renames_nothing(tmp_path, kind):
    folder, outside = junk(tmp_path, kind)
    before = sorted(p.name for p in folder.iterdir())
    fifos = [folder / "step_00000003.pt", folder / "latest"]
    path, saved = within(10, lambda: read_newest(folder), fifos)
    assert path == folder / "step_00000002.pt" and saved["part"]["value"] == 2
    assert sorted(p.name for p in folder.iterdir()) == before
    assert outside.read_bytes() == b"PK\x03\x04 not yours to rename"


def test_latest_names_only_a_step_file_of_its_folder(tmp_path):
    saved_steps(tmp_path)
    for pointer in ("../step_00000001.pt", "/etc/passwd", "step_1.pt.bak", "sub/step_00000001.pt", ""):
        (tmp_path / "latest").write_text(pointer)
        assert latest_checkpoint(tmp_path) == tmp_path / "step_00000002.pt"
    (tmp_path / "latest").write_text("step_00000001.pt\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001.pt"


def test_a_named_file_that_is_not_a_checkpoint_is_one_line_without_blocking(tmp_path):
    from vlmtrain.checkpoint.load import read_source
    from vlmtrain.checkpoint.manager import NotACheckpoint

    os.mkfifo(tmp_path / "fifo.pt")
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    (tmp_path / "notes.pt").write_text("hello\n")
    for name in ("fifo.pt", "zero.pt", "notes.pt"):
        path = tmp_path / name
        with pytest.raises(NotACheckpoint, match="not a checkpoint") as error:
            within(10, lambda path=path: read_source(path), [tmp_path / "fifo.pt"])
        assert "\n" not in str(error.value)


def test_a_run_with_step_folders_is_read_without_blocking_on_latest(tmp_path):
    """eval, export and load_pretrained list a run's checkpoints of both kinds with the one pointer reader
    resume uses: a FIFO named `latest` beside a step folder is passed over, and the newest of either kind
    read (here step 2's file, which is not a model's checkpoint); it used to block the folders' lookup."""
    folder = tmp_path / "run" / "checkpoints"
    saved_steps(folder)
    (folder / "step_00000001").mkdir()
    (folder / "step_00000001" / ".metadata").touch()
    (folder / "latest").unlink()
    os.mkfifo(folder / "latest")
    with pytest.raises(ValueError, match=r"step_00000002\.pt: not a vlmtrain training checkpoint"):
        within(10, lambda: read_source(tmp_path / "run"), [folder / "latest"])
