"""Training runs on forked gloo ranks (`tests.helpers.ranks`), as a launcher would run them: the configs
that reach the ranks, the work each rank does, and a SIGKILL of every rank at a chosen point."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from tests.helpers.runs import read_metrics
from vlmtrain.distributed.sharding import full_state_dict
from vlmtrain.train.trainer import Trainer


def join_as_rank(rank: int, world: int) -> None:
    """In a forked rank: the variables torchrun sets (the group exists already)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))


def portable(configs: dict) -> dict:
    """Composed configs as plain, resolved containers, to reach the ranks by pickle (their structured
    node types are made at composition and cannot be; Hydra's resolvers exist only in this process)."""
    return {key: OmegaConf.to_container(cfg, resolve=True) for key, cfg in configs.items()}


def train(cfg: DictConfig | dict) -> dict:
    """Train to the end; the final evaluation, the full weights (rank 0; {} on the others) and the logged
    steps (rank 0)."""
    with Trainer.from_config(OmegaConf.create(cfg)) as trainer:
        results = trainer.train()
        weights = full_state_dict(trainer.model)
    rows = read_metrics(trainer.run_dir) if trainer.env.is_main else []
    return {"eval": results, "weights": weights, "rows": [row for row in rows if "loss" in row]}


def train_each(rank: int, world: int, configs: dict) -> dict:
    """A rank's work (`fork_ranks`): each of `configs` (name -> `portable` config) trained in turn, a run
    that stopped resumed by the next; name -> what `train` returns."""
    join_as_rank(rank, world)
    return {key: train(cfg) for key, cfg in configs.items()}


def kill_when(ranks: mp.ProcessContext, ready: Callable[[], bool], timeout_s: float = 180) -> None:
    """SIGKILL every rank (`start_ranks`) once `ready()`."""
    deadline = time.monotonic() + timeout_s
    while not ready() and time.monotonic() < deadline and all(p.is_alive() for p in ranks.processes):
        time.sleep(0.01)
    assert ready(), "the run ended or stalled before the point to kill it at"
    for process in ranks.processes:
        os.kill(process.pid, signal.SIGKILL)
    for process in ranks.processes:
        process.join()
