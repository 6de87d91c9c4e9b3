"""A staged folder replaces its target whole, or not at all."""

import pytest

from vlmtrain.staging import staged_folder


def test_success_replaces_the_old_folder_whole(tmp_path):
    out = tmp_path / "out"
    (out / "stale").mkdir(parents=True)
    with staged_folder(out, durable=True) as staging:
        (staging / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()  # nothing visible until the block ends
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no scratch or old folder left


def test_failure_keeps_the_old_folder_and_leaves_no_scratch(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(out) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (out / "old.txt").read_text() == "old" and not (out / "half.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
