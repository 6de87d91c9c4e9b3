"""Data reads that stall cannot hold a run: a stalled HTTP server and a silent `pipe:` command cost
`data.read_timeout_s` per try, are counted, and the run finishes; a stop signal while the run waits for
data stops it at once as `stopped`, resumable; whatever ends the trainer (SIGKILL too) ends its data
workers and their commands; a killed data worker is one line and the run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.http import serve
from tests.helpers.runs import SMALL_MODEL, data_overrides, read_metrics, run_cli
from tests.helpers.shards import keyed_shards
from vlmtrain import cli
from vlmtrain.train.status import read_status

QUICK_READS = ["data.read_timeout_s=1", "data.shard_retries=1", "data.retry_backoff_s=0.1"]


def _command(root: Path, run_dir: Path, shards: str, *overrides: str) -> list[str]:
    return [
        str(Path(sys.executable).parent / "vlmtrain-train"),
        *data_overrides(root),
        *SMALL_MODEL,
        f"run_dir={run_dir}",
        f"data.train_shards='{shards}'",  # quoted: a shell line holds ; | [ ]
        "data.val_shards=null",
        "data.zeroshot_dir=null",
        "data.samples_per_epoch=48",
        "data.batch_size=8",
        "data.num_workers=1",
        "data.shuffle_buffer=8",
        "trainer.log_every=1",
        "trainer.max_steps=8",
        *overrides,
    ]


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


def _gone(processes: list[psutil.Process]) -> bool:
    def dead(process: psutil.Process) -> bool:
        try:
            return process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return all(dead(process) for process in processes)


def _waiting_commands(pid: int) -> list[psutil.Process]:
    """The trainer's descendants once its data worker runs `sleep` (the silent command)."""
    _wait_for(lambda: any(p.name() == "sleep" for p in _descendants(pid)), 120)
    family = _descendants(pid)
    assert {"pt_data_worker", "sh", "sleep"} <= {p.name() for p in family}, [p.name() for p in family]
    return family


@pytest.fixture
def shards(tmp_path) -> Path:
    root = tmp_path / "shards"
    root.mkdir()
    keyed_shards(root, [16, 16, 16])
    return root


@pytest.mark.slow
def test_a_stalled_server_and_a_silent_command_are_counted_and_the_run_finishes(
    synthetic_root, shards, tmp_path, capsys
):
    with serve(shards, faults={"s-000001.tar": ["stall", "stall"]}) as server:
        urls = "::".join(f"{server.url}/s-{n:06d}.tar" for n in range(3))
        command = _command(synthetic_root, tmp_path / "run", f"{urls}::pipe:sleep 1000", *QUICK_READS)
        start = time.monotonic()
        done = run_cli(cli.train, command[1:], capsys)  # the command, in this process
        took = time.monotonic() - start
        assert server.requests["s-000001.tar"] >= 2
    assert done.returncode == 0, done.stderr[-3000:]
    last = read_metrics(tmp_path / "run")[-1]
    assert last["step"] == 8 and last["data/bad_truncated"] >= 1 and last["data/bad_unreadable"] >= 1
    assert took < 120, took  # a few 1 s timeouts, where the stall used to hold the run until the server left
    assert read_status(tmp_path / "run")["state"] == "finished"


@pytest.mark.slow
def test_sigterm_while_waiting_for_data_stops_the_run_at_once_and_it_resumes(
    synthetic_root, shards, tmp_path, capsys
):
    flag, run_dir = tmp_path / "ready", tmp_path / "run"
    stall = "::".join(
        f"pipe:[ -e {flag} ] || sleep 1000; cat {path}" for path in sorted(shards.glob("*.tar"))
    )
    command = _command(synthetic_root, run_dir, stall)
    process = _start(command)
    family = _waiting_commands(process.pid)
    time.sleep(1)  # the main process waits for its first batch
    stopped_at = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - stopped_at < 30  # the command would sleep 1000 s
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stderr.strip().splitlines() == [
        "stopped by SIGTERM at step 0; checkpoint saved: run the same command to resume"
    ], stderr[-3000:]
    assert read_status(run_dir)["state"] == "stopped"
    assert _wait_for(lambda: _gone(family), 5), [p for p in family if not _gone([p])]

    flag.touch()  # the commands now write their shards
    resumed = run_cli(cli.train, command[1:], capsys)  # the same command, in this process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [row["step"] for row in read_metrics(run_dir)] == list(range(1, 9))
    assert read_status(run_dir)["state"] == "finished"


@pytest.mark.slow
def test_no_worker_or_command_outlives_a_sigkilled_trainer(synthetic_root, shards, tmp_path):
    process = _start(_command(synthetic_root, tmp_path / "run", "pipe:sleep 1000::pipe:sleep 1001"))
    family = _waiting_commands(process.pid)
    assert any(p.name() == "sleep" for p in family)
    process.kill()
    process.communicate(timeout=30)
    assert _wait_for(lambda: _gone(family), 5), [(p.pid, p.name()) for p in family if not _gone([p])]


@pytest.mark.slow
def test_a_killed_data_worker_is_one_line_and_the_run_resumes(synthetic_root, shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    command = _command(
        synthetic_root, run_dir, str(shards), "trainer.max_steps=400", "trainer.checkpoint_every=2"
    )
    process = _start(command)
    assert _wait_for(lambda: (run_dir / "checkpoints" / "latest").exists() or process.poll() is not None, 180)
    workers = psutil.Process(process.pid).children()  # the data worker (torch names it pt_data_worker)
    assert len(workers) == 1, [p.name() for p in workers]
    os.kill(workers[0].pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr[-3000:]
    assert stderr.strip().splitlines() == [
        f"error: data worker pid {workers[0].pid} was killed (signal 9: out of memory?); "
        "run the same command to resume"
    ], stderr[-3000:]
    status = read_status(run_dir)
    assert status["state"] == "failed" and "data worker" in status["error"]

    finish = [*command[:-2], "trainer.max_steps=20", "trainer.checkpoint_every=2"]
    resumed = run_cli(cli.train, finish[1:], capsys)  # the same command, in this process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
