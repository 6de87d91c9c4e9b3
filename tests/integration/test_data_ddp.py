"""The stream under 2 ranks x 2 workers: the same steps on every rank whatever its shards hold, and a
run killed anywhere resumes on exactly the samples of the uninterrupted run."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.helpers.forked_runs import kill_when, portable, train_each
from tests.helpers.ranks import fork_ranks, start_ranks
from tests.helpers.runs import SMALL_MODEL, compose_train
from tests.helpers.shards import keyed_shards, png_bytes, write_tar
from vlmtrain.data.loader import TrainLoader
from vlmtrain.data.transforms import image_transform
from vlmtrain.schema import DataConfig


def _uneven_shards(root: Path) -> None:
    keyed_shards(root, [50, 10, 80, 30, 5, 60, 20, 45])
    bad = [{"__key__": f"bad{i}", "png": b"broken", "txt": "x"} for i in range(3)]
    write_tar(root / "s-000008.tar", bad + [{"__key__": "nocap", "png": png_bytes()}])


def _steps(rank: int, world: int, root: str) -> dict:
    config = DataConfig(
        train_shards=root, batch_size=8, num_workers=2, shuffle_buffer=10, samples_per_epoch=304
    )
    transform = image_transform(8, (0.5,) * 3, (0.5,) * 3, normalize=False)
    loader = TrainLoader(config, transform, lambda t: torch.zeros(len(t), 1), 0, rank=rank, world_size=world)
    steps = 0
    for _ in zip(range(3 * loader.steps_per_epoch), loader):
        step = torch.ones(1)
        dist.all_reduce(step)  # as the gradient all-reduce: a rank without a batch would leave it waiting
        steps += int(step.item() == world)
    state = loader.state_dict()  # a collective too: every rank's cursors
    return {"steps": steps, "per_epoch": loader.steps_per_epoch, "epoch": loader.epoch, "state": state}


@pytest.mark.slow
def test_two_ranks_with_uneven_shards_run_the_same_steps_without_a_hang(tmp_path):
    _uneven_shards(tmp_path / "data")
    results = fork_ranks(_steps, 2, tmp_path, str(tmp_path / "data"), timeout_s=120)
    assert [r["per_epoch"] for r in results] == [19, 19]  # 304 // (8 x 2)
    assert [r["steps"] for r in results] == [57, 57] and [r["epoch"] for r in results] == [3, 3]
    state = results[0]["state"]
    assert sorted(state["cursors"]) == [0, 1, 2, 3] and state["batches"] == 57
    assert state["bad"]["image"] + state["bad"]["caption"] >= 1  # the broken shard is read by a slot


def _train_config(run_dir: Path, root: Path) -> dict:
    return portable(
        {
            "run": compose_train(
                [
                    *SMALL_MODEL, f"run_dir={run_dir}", "data.synthetic=null", f"data.train_shards={root}",
                    "data.val_shards=null", "data.zeroshot_dir=null", "data.batch_size=8", "data.num_workers=2",
                    "data.shuffle_buffer=20", "data.record_keys=true", "trainer.max_steps=24",
                    "trainer.checkpoint_every=4", "trainer.log_every=4",
                ]
            )
        }
    )  # fmt: skip


def _trained_keys(run_dir: Path) -> Counter:
    """The keys of every step, the last attempt of each step kept (a resumed run redoes some)."""
    steps: dict[tuple[int, int], list[str]] = {}
    for rank in range(2):
        for line in (run_dir / "keys" / f"rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            steps[(rank, row["step"])] = row["keys"]
    assert sorted({s for _, s in steps}) == list(range(1, 25))
    return Counter(k for keys in steps.values() for k in keys)


@pytest.mark.slow
def test_a_two_rank_run_killed_anywhere_resumes_on_exactly_the_same_samples(tmp_path):
    """2 forked gloo ranks, each with 2 data workers, as a run; the killed run's ranks are SIGKILLed (their
    workers then end on their own), and the same config run again resumes it."""
    root = tmp_path / "data"
    keyed_shards(root, [23, 31, 17, 29, 40, 12], size=16)
    fork_ranks(train_each, 2, tmp_path, _train_config(tmp_path / "whole", root), timeout_s=120)

    killed_at = random.Random().randint(6, 20)
    killed = _train_config(tmp_path / "killed", root)
    keys = tmp_path / "killed" / "keys" / "rank0.jsonl"
    ranks = start_ranks(train_each, 2, tmp_path, killed, timeout_s=120)
    kill_when(ranks, lambda: keys.exists() and len(keys.read_text().splitlines()) >= killed_at)
    fork_ranks(train_each, 2, tmp_path, killed, timeout_s=120)
    assert _trained_keys(tmp_path / "killed") == _trained_keys(tmp_path / "whole"), killed_at
