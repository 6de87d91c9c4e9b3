"""Real multi-process training: torchrun, gloo process group, DDP, rank-0 checkpoints, resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.configs.test_configs import data_overrides
from tests.integration.test_train import SMALL_MODEL


def torchrun(run_dir: Path, root: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "vlmtrain.cli",
        *data_overrides(root),
        *SMALL_MODEL,
        f"run_dir={run_dir}",
        "data.batch_size=8",
        "data.num_workers=1",
        "trainer.log_every=1",
        "data.val_shards=null",
        *overrides,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["clip", "llip"])
def test_two_process_run_trains_checkpoints_and_resumes(loss, synthetic_root, tmp_path):
    extra = (
        ["loss=llip", "model.image_encoder.mixture_tokens=4", "model.num_heads=2"] if loss == "llip" else []
    )
    first = torchrun(tmp_path, synthetic_root, "trainer.max_steps=4", "trainer.checkpoint_every=2", *extra)
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(tmp_path, synthetic_root, "trainer.max_steps=6", "trainer.checkpoint_every=2", *extra)
    assert second.returncode == 0, second.stderr[-3000:]

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes metrics; the resumed run continues at 5
    assert all(row["samples_per_s"] > 0 for row in rows if "loss" in row)
    saved = torch.load(tmp_path / "checkpoints" / "step_00000006.pt", weights_only=False)
    assert saved["train_state"]["samples_seen"] == 6 * 16
    assert "zeroshot/acc1" in json.loads((tmp_path / "eval.json").read_text())
