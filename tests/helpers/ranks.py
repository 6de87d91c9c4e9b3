"""Real gloo process groups on CPU for the distributed tests: forked ranks, each saving its results."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# what most ranks import, and build (rank_warmup): each rank forks with it (the trainer's import alone
# is 0.2 to 0.4 CPU s per rank)
_PRELOAD = [
    "torch",
    "torch.distributed",
    "open_clip",
    "vlmtrain.models",
    "vlmtrain.losses",
    "vlmtrain.train.trainer",
    __name__,
    "tests.helpers.rank_warmup",
]


def fork_ranks(
    work: Callable[..., dict], world: int, out_dir: Path, *args: Any, timeout_s: int = 60
) -> list[dict]:
    """Run `work(rank, world, *args)` on `world` ranks of one gloo group; return each rank's dict.

    The ranks are forked from a fork server, a clean single-threaded process that imported torch and the
    trainer once (the bulk of a rank's start-up) when the first test asked for ranks. Forking the test
    process itself is faster still but unsafe: by then earlier tests have started threads (thread pools,
    data loader and process-group threads), and a child forked while one of them held a lock waits
    forever for it, which its peers see as a gloo timeout. A rank left waiting fails after `timeout_s`
    instead of hanging the suite. `work` and `args` travel by pickle: `work` must be a module-level
    function."""
    _start(work, world, out_dir, args, timeout_s, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def start_ranks(
    work: Callable[..., dict], world: int, out_dir: Path, *args: Any, timeout_s: int = 60
) -> mp.ProcessContext:
    """`fork_ranks` without waiting for the ranks: their context (`.processes`), for a test that kills
    them (SIGKILL) while they run."""
    return _start(work, world, out_dir, args, timeout_s, join=False)


def _start(
    work: Callable[..., dict], world: int, out_dir: Path, args: tuple, timeout_s: int, join: bool
) -> mp.ProcessContext | None:
    mp.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts: the first call only
    args = (work, world, _free_port(), str(out_dir), timeout_s, args)
    return mp.start_processes(_rank, args=args, nprocs=world, join=join, start_method="forkserver")


def _rank(
    rank: int, work: Callable[..., dict], world: int, port: int, out_dir: str, timeout_s: int, args: tuple
) -> None:
    torch.set_num_threads(1)
    # a fork server's child inherits its start method; data loader workers fork from the rank, as in a run
    multiprocessing.set_start_method("fork", force=True)
    # in the rank only: set in the test process, it would reach the SLURM jobs submitted later (sbatch
    # exports the environment), whose ranks on two nodes would then offer gloo only the loopback
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout)
    try:
        torch.save(work(rank, world, *args), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
