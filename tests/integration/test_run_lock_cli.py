"""One run per folder through `vlmtrain-train`: a second launch of a running run ends in one line and
touches nothing; a killed run's lock does not block the same command; a read-only folder is one line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers.runs import SMALL_MODEL, data_overrides, read_metrics, run_cli
from vlmtrain import cli
from vlmtrain.train.run_lock import LOCK_FILE

STEPS = 12


def _command(root: Path, run_dir: Path, *extra: str) -> list[str]:
    script = Path(sys.executable).parent / "vlmtrain-train"
    return [
        str(script),
        *data_overrides(root),
        *SMALL_MODEL,
        f"run_dir={run_dir}",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every=1",
        "trainer.checkpoint_every=3",
        "data.batch_size=16",
        "data.num_workers=1",
        "data.val_shards=null",
        "data.zeroshot_dir=null",
        *extra,
    ]


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_two_launches_one_second_apart_train_once(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    first = _start(_command(synthetic_root, run_dir))
    time.sleep(1)
    second = _start(_command(synthetic_root, run_dir))
    outputs = [process.communicate(timeout=300) for process in (first, second)]
    codes = [first.returncode, second.returncode]
    assert sorted(codes) == [0, 2], outputs
    winner, loser = (first, second) if codes[0] == 0 else (second, first)
    refused = _lines(outputs[[first, second].index(loser)][1])
    assert len(refused) == 1, refused
    assert refused[0].startswith(f"error: {run_dir} is in use by pid {winner.pid} on host "), refused
    assert [row["step"] for row in read_metrics(run_dir) if "loss" in row] == list(range(1, STEPS + 1))
    assert [p.name for p in (run_dir / "configs").iterdir()] == ["000.yaml"]  # one launch recorded
    assert not (run_dir / LOCK_FILE).exists()  # let go at the end


@pytest.mark.slow
def test_a_killed_runs_lock_does_not_block_the_same_command(synthetic_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    killed = _start(_command(synthetic_root, run_dir))
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    assert (run_dir / LOCK_FILE).exists()  # left behind: its holder had no chance to let go

    again = run_cli(cli.train, _command(synthetic_root, run_dir)[1:], capsys)  # the same command, here
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"pid {killed.pid} has ended" in again.stdout + again.stderr
    assert "resumed from" in again.stdout + again.stderr
    assert [row["step"] for row in read_metrics(run_dir) if "loss" in row] == list(range(1, STEPS + 1))


def _as_another_user(command: list[str]) -> list[str]:
    """Root writes in read-only folders: run the command as `nobody` then."""
    if os.geteuid() != 0:
        return command
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: no folder is read-only")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]


@pytest.mark.slow
def test_a_read_only_run_folder_is_one_line():
    with tempfile.TemporaryDirectory() as scratch:  # in /tmp: reachable by another user
        run_dir, home = Path(scratch) / "run", Path(scratch) / "home"
        run_dir.mkdir()
        home.mkdir()
        for path, mode in ((Path(scratch), 0o755), (home, 0o777), (run_dir, 0o555)):
            path.chmod(mode)
        script = Path(sys.executable).parent / "vlmtrain-train"
        done = subprocess.run(
            _as_another_user([str(script), *SMALL_MODEL, f"run_dir={run_dir}"]),
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ | {"HOME": str(home), "MPLCONFIGDIR": str(home)},
        )
        assert done.returncode == 2, done.stderr
        assert _lines(done.stderr) == [
            f"error: {run_dir}: cannot write in the run folder (Permission denied)"
        ], done.stderr
        assert list(run_dir.iterdir()) == []
