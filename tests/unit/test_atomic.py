"""A staged folder replaces its target whole, or not at all."""

import pytest

from vlmtrain.atomic import staged_folder, write_atomic, write_text_atomic
from vlmtrain.dotted import flatten


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


def test_a_file_write_that_fails_leaves_the_old_file_and_no_scratch(tmp_path):
    path = tmp_path / "status.json"
    write_text_atomic(path, "old")

    def half(handle):
        handle.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, half)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["status.json"]
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_flat_keys_keep_lists_as_values_and_empty_mappings_as_asked():
    tree = {"a": {"b": 1, "c": [1, 2]}, "d": {}}
    assert flatten(tree) == {"a.b": 1, "a.c": [1, 2], "d": {}}
    assert flatten(tree, keep_empty=False) == {"a.b": 1, "a.c": [1, 2]}
