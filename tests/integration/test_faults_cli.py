"""Faults met through the real entry points: a crafted checkpoint runs no code from train, eval, export
or load_pretrained; a disk too small for the next checkpoint stops the run in one line with the
previous checkpoint intact, and a rerun with space finishes. The entry points (`cli.train`, ...) run in
this process, with their own argv, exit code, stdout and stderr: the same code as the console scripts,
without starting an interpreter for each."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import SMALL_MODEL, CliResult, data_overrides, run_cli
from vlmtrain import cli
from vlmtrain.checkpoint.load import load_pretrained
from vlmtrain.checkpoint.manager import UnsafeCheckpoint, read_checkpoint


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run directory whose only checkpoint would run `touch pwned` if unpickled freely."""
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    (run_dir / "checkpoints").mkdir(parents=True)
    payload = {"model": RunsCode(marker), "config": {"model": {}}, "train_state": {"step": 1}}
    torch.save(payload, run_dir / "checkpoints" / "step_00000001.pt")
    return run_dir, marker


def one_line_error(result: CliResult, code: int, needle: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr[-3000:]


def test_load_pretrained_refuses_a_crafted_checkpoint(tmp_path):
    run_dir, marker = crafted_run(tmp_path)
    for source in (run_dir, run_dir / "checkpoints" / "step_00000001.pt"):
        with pytest.raises(UnsafeCheckpoint, match="refused"):
            load_pretrained(source)
    assert not marker.exists()


def train_args(run_dir: Path, root: Path, *overrides: str) -> list[str]:
    return [
        *data_overrides(root),
        *SMALL_MODEL,
        f"run_dir={run_dir}",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.val_shards=null",
        "data.zeroshot_dir=null",
        *overrides,
    ]


@pytest.mark.slow
def test_train_eval_and_export_refuse_a_crafted_checkpoint(synthetic_root, tmp_path, capsys):
    run_dir, marker = crafted_run(tmp_path)
    checkpoint = run_dir / "checkpoints" / "step_00000001.pt"
    train = train_args(run_dir, synthetic_root, "trainer.max_steps=2")
    one_line_error(run_cli(cli.train, train, capsys), 2, "refused")
    one_line_error(run_cli(cli.evaluate, [f"checkpoint={run_dir}"], capsys), 2, "refused")
    export = [str(checkpoint), "--out", str(tmp_path / "x")]
    one_line_error(run_cli(cli.export, export, capsys), 2, "refused")
    assert not marker.exists() and not (tmp_path / "x").exists()


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.slow
def test_a_disk_too_small_for_the_next_checkpoint_stops_in_one_line(synthetic_root, tmp_path, capsys):
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or shutil.which("mount") is None or not _mount_tmpfs(disk, "1g"):
        pytest.skip(
            "cannot mount a tmpfs here (the manager's ENOSPC path is tested in test_checkpoint_faults)"
        )
    try:
        run_dir, steps = disk / "run", ["trainer.checkpoint_every=2", "trainer.keep_checkpoints=1"]
        first = run_cli(cli.train, train_args(run_dir, synthetic_root, "trainer.max_steps=2", *steps), capsys)
        assert first.returncode == 0, first.stderr[-3000:]
        size = (run_dir / "checkpoints" / "step_00000002.pt").stat().st_size
        used = sum(p.stat().st_size for p in disk.rglob("*") if p.is_file())
        subprocess.run(["mount", "-o", f"remount,size={used + size // 2}", str(disk)], check=True)

        four = train_args(run_dir, synthetic_root, "trainer.max_steps=4", *steps)
        full = run_cli(cli.train, four, capsys)
        intact = run_dir / "checkpoints" / "step_00000002.pt"
        one_line_error(
            full, 1, f"checkpoint of step 4 not written (No space left on device); {intact} is intact"
        )
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000002.pt"]
        assert read_checkpoint(intact)["train_state"]["step"] == 2

        subprocess.run(["mount", "-o", "remount,size=1g", str(disk)], check=True)
        rerun = run_cli(cli.train, four, capsys)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert (
            "resumed from" in rerun.stdout
            and (run_dir / "checkpoints" / "latest").read_text() == "step_00000004.pt"
        )
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_data_that_fails_mid_run_exits_3_not_as_a_config_error(tmp_path, capsys):
    """Shards that all turn out unreadable at the first step are a data failure (exit 3, the run directory
    kept for a resume once the shards are fixed), not a typo in the config (exit 2)."""
    shards = tmp_path / "data"
    shards.mkdir()
    for n in range(2):
        (shards / f"{n:06d}.tar").write_bytes(b"")  # zero bytes: no sample can be read
    args = [
        "data.synthetic=null",
        f"data.train_shards={shards}/{{000000..000001}}.tar",
        "data.samples_per_epoch=100",
        *SMALL_MODEL,
        f"run_dir={tmp_path / 'run'}",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.val_shards=null",
        "data.zeroshot_dir=null",
        "trainer.max_steps=2",
    ]
    one_line_error(run_cli(cli.train, args, capsys), 3, "data source 0: no readable sample")
    assert (tmp_path / "run" / "config.json").is_file()
