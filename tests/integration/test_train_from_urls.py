"""A training run reads its shards (and its evaluation shards) over HTTP exactly as from local files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.http import serve
from tests.helpers.runs import config, read_metrics, run_training
from vlmtrain.schema import DataConfig

STEPS = ["trainer.max_steps=4", "trainer.log_every=1", "data.batch_size=16", "data.num_workers=0"]


def _losses(root: Path, run_dir: Path, train: str, val: str) -> tuple[list[float], dict[str, float]]:
    overrides = [*STEPS, f"data.train_shards={train}", f"data.val_shards={val}", "data.zeroshot_dir=null"]
    if "samples_per_epoch" in DataConfig.__dataclass_fields__:  # remote shards have no sizes.json
        sizes = json.loads((root / "train" / "sizes.json").read_text())
        overrides.append(f"data.samples_per_epoch={sum(sizes.values())}")
    results = run_training(config(root, run_dir, *overrides))
    return [row["loss"] for row in read_metrics(run_dir) if "loss" in row], results


@pytest.mark.slow
def test_training_from_http_shards_matches_local_files(synthetic_root, tmp_path):
    names = sorted(p.name for p in (synthetic_root / "train").glob("*.tar"))
    local = _losses(synthetic_root, tmp_path / "local", synthetic_root / "train", synthetic_root / "val")
    assert len(local[0]) == 4
    with serve(synthetic_root) as server:
        train = "::".join(f"{server.url}/train/{name}" for name in names)
        val = "::".join(f"{server.url}/val/{p.name}" for p in sorted((synthetic_root / "val").glob("*.tar")))
        assert _losses(synthetic_root, tmp_path / "http", train, val) == local
        assert server.requests[f"train/{names[0]}"] >= 1 and server.requests.total() > 1
