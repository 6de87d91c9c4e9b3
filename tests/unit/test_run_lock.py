"""The run folder's lock: one holder, refused in one line naming it, stale holders taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from vlmtrain.train.run_lock import LOCK_FILE, RunInUse, RunLock, stale_reason, this_process


def _plant(run_dir: Path, **fields) -> dict:
    """A lock file as another process would have left it."""
    holder = asdict(replace(this_process(), **fields))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))
    return holder


def _ended_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(autouse=True)
def _no_locks_left():
    yield
    RunLock.release_all()


def test_the_lock_names_its_holder_and_goes_when_released(tmp_path):
    lock = RunLock.take(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert saved["pid"] == os.getpid() and saved["host"] and saved["since"] and saved["pid_start"]
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK_FILE]  # no private file left
    lock.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_taking_it_again_in_the_same_process_counts(tmp_path):
    first, second = RunLock.take(tmp_path), RunLock.take(tmp_path)
    assert first is second
    second.release()
    assert (tmp_path / LOCK_FILE).exists()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_holder_refuses_in_one_line_naming_it(tmp_path):
    parent = os.getppid()  # alive, on this host, not this process
    _plant(tmp_path, pid=parent, pid_start=None, since="2026-01-01 00:00:00 UTC", slurm_job="77")
    before = (tmp_path / LOCK_FILE).read_text()
    with pytest.raises(RunInUse) as refused:
        RunLock.take(tmp_path)
    message = str(refused.value)
    assert "\n" not in message
    assert f"{tmp_path} is in use by pid {parent} on host " in message
    assert "since 2026-01-01 00:00:00 UTC, SLURM job 77" in message
    assert (tmp_path / LOCK_FILE).read_text() == before  # untouched


def test_a_holder_on_another_host_is_not_judged_from_here(tmp_path):
    _plant(tmp_path, host="elsewhere", pid=_ended_pid())
    with pytest.raises(RunInUse, match="on host elsewhere .*delete .*run.lock if it no longer runs"):
        RunLock.take(tmp_path)


def test_an_ended_holder_on_this_host_is_taken_over(tmp_path, caplog):
    dead = _ended_pid()
    _plant(tmp_path, pid=dead)
    with caplog.at_level("WARNING", logger="vlmtrain"):
        RunLock.take(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"pid {dead} has ended" in caplog.text


def test_a_reused_pid_is_not_the_holder(tmp_path):
    """The recorded pid runs, but as a process started at another time: the holder is gone."""
    parent = os.getppid()
    _plant(tmp_path, pid=parent, pid_start="some-other-boot:12345")
    RunLock.take(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_requeued_slurm_job_takes_over_its_earlier_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    me = this_process()
    earlier = replace(me, host="node-a", pid=os.getppid(), slurm_restart="0")
    assert stale_reason(earlier, me) == "SLURM requeued job 4242"
    assert stale_reason(replace(earlier, slurm_job="4243"), me) is None  # another job: not judged
    _plant(tmp_path, **asdict(earlier) | {"token": "x"})
    RunLock.take(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["slurm_restart"] == "1"


def test_a_lock_taken_over_is_not_removed_by_its_old_holder(tmp_path):
    lock = RunLock.take(tmp_path)
    _plant(tmp_path, pid=os.getppid())  # someone judged this process gone and took the folder
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getppid()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_a_read_only_run_folder_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    try:
        with pytest.raises(RunInUse, match=r"run: cannot write in the run folder \(Permission denied\)$"):
            RunLock.take(run_dir)
    finally:
        run_dir.chmod(0o755)


RACER = """
import sys, time
from pathlib import Path
from vlmtrain.train.run_lock import RunInUse, RunLock
run_dir, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
try:
    lock = RunLock.take(run_dir)
except RunInUse as error:
    print("refused", error)
else:
    print("took")
    time.sleep(3)
    lock.release()
"""


@pytest.mark.slow
def test_of_processes_racing_for_a_stale_lock_exactly_one_takes_it(tmp_path):
    _plant(tmp_path / "run", pid=_ended_pid())
    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp_path / "run"), str(go)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    time.sleep(3)  # every racer has started and waits
    go.touch()
    outputs = [racer.communicate(timeout=60)[0] for racer in racers]
    assert sorted(out.split()[0] for out in outputs) == ["refused", "refused", "refused", "took"], outputs
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # released; no private file left
