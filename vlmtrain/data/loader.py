"""The data a training run reads: checked before the first step, streamed without end, counted in epochs
of `samples_per_epoch` samples, and a position (`state_dict`) from which a resumed run continues with
exactly the batches the uninterrupted run would have had.

Every rank runs the same steps per epoch whatever its shards hold: the stream has no epoch boundary, so
no rank ever runs out while another waits. The position is each slot's cursor (vlmtrain.data.cursor)
after the last batch handed out; restoring re-reads only the current shards and the shuffle buffer.
"""

from __future__ import annotations

import functools
import gc
import logging
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.data._utils.signal_handling import _remove_worker_pids

from vlmtrain.data.accounting import DataError, total, worker_message, worst_shards
from vlmtrain.data.buffers import BatchBuffers
from vlmtrain.data.cursor import Cursor
from vlmtrain.data.reshard import Layout, Reading, reshard
from vlmtrain.data.shards import expand_shards, shard_sizes
from vlmtrain.data.shards import read_options as config_read_options
from vlmtrain.data.stream import ShardStream
from vlmtrain.data.streams import die_with_parent
from vlmtrain.data.transforms import limit_image_pixels
from vlmtrain.datasets.synthetic import ensure_synthetic
from vlmtrain.distributed.env import barrier
from vlmtrain.distributed.stop import ignore_stop_signals
from vlmtrain.schema import ConfigError, DataConfig

log = logging.getLogger("vlmtrain")


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (B, 3, H, W)
    tokens: torch.Tensor
    keys: list[str]  # the samples' __key__, in batch order


def source_specs(config: DataConfig) -> list[tuple[str, str, float]]:
    """(config key, shard spec, weight) of each training source."""
    if config.sources is not None:
        return [(f"data.sources[{n}].shards", s.shards, s.weight) for n, s in enumerate(config.sources)]
    return [("data.train_shards", config.train_shards, 1.0)]


def prepare_data(config: DataConfig, is_main: bool) -> None:
    """Write the synthetic dataset on first use (rank 0), then check that every shard path exists."""
    if config.synthetic is not None:
        if is_main:
            ensure_synthetic(**vars(config.synthetic))
        barrier()
    for key, spec, _ in source_specs(config):
        expand_shards(spec, key)
    if config.val_shards:
        expand_shards(config.val_shards, "data.val_shards")
    if config.zeroshot_dir and not Path(config.zeroshot_dir).expanduser().is_dir():
        raise FileNotFoundError(f"data.zeroshot_dir: no such directory {config.zeroshot_dir}")
    for name, shards in config.retrieval.items():
        expand_shards(shards, f"data.retrieval.{name}")
    for name, root in config.zeroshot.items():
        if not Path(root).expanduser().is_dir():
            raise FileNotFoundError(f"data.zeroshot.{name}: no such directory {root}")


def epoch_samples(config: DataConfig, sources: list[list[str]], sizes: dict[str, int] | None) -> int:
    """`data.samples_per_epoch`, else the sources' sample count from sizes.json."""
    if config.samples_per_epoch is not None:
        return config.samples_per_epoch
    if config.resampled or sizes is None:
        why = (
            "data.resampled is set"
            if config.resampled
            else "no sizes.json or img2dataset *_stats.json lists the shards"
        )
        raise ConfigError(f"data.samples_per_epoch: required ({why}); set the samples in one epoch")
    return sum(sizes[shard] for shards in sources for shard in shards)


def _start_worker(_worker_id: int, parent: int, max_image_pixels: int, scratch: str) -> None:
    ignore_stop_signals()  # the main process saves and stops the run
    die_with_parent(signal.SIGKILL, parent)  # whatever ends the trainer (SIGKILL too) ends its workers
    # A worker hands its batches over through multiprocessing's file-descriptor server, whose socket is in
    # multiprocessing's temporary folder, which only a process that exits normally removes: the loader
    # kills its workers, so it gives them its own folder (`scratch`) and removes that after them.
    multiprocessing.current_process()._config["tempdir"] = scratch
    limit_image_pixels(max_image_pixels)
    gc.enable()  # forked from a training loop that collects at step boundaries only (train/garbage_collection.py)


def _stop_workers(running: Any) -> None:
    """Kill a DataLoader iterator's workers and wait for them; then its own shutdown."""
    if running._worker_pids_set:  # a worker killed here is no error: stop watching for one first
        _remove_worker_pids(id(running))
        running._worker_pids_set = False
    for worker in running._workers:
        if worker.is_alive():
            worker.kill()
        worker.join()
    running._shutdown_workers()


class DataWorkerKilled(RuntimeError):
    """A data worker died by a signal (the kernel's out-of-memory killer, a user): one line."""


_KILLED = re.compile(r"DataLoader worker \(pid (\d+)\) is killed by signal: ([^.]+)")
_EXITED = re.compile(r"DataLoader worker \(pid\(s\) ([\d, ]+)\) exited unexpectedly")
_SIGNALS = {signal.strsignal(s): s for s in signal.Signals}


def worker_death(error: BaseException) -> DataWorkerKilled | None:
    """The one-line error for torch's report of a dead data worker; None for any other error."""
    if isinstance(error, DataWorkerKilled):
        return error
    text = str(error)
    if killed := _KILLED.search(text):
        number = _SIGNALS.get(killed.group(2).strip())
        return DataWorkerKilled(_death_line(int(killed.group(1)), -number if number else None))
    if exited := _EXITED.search(text):
        return DataWorkerKilled(_death_line(exited.group(1), None))
    return None


def _dead_worker(running: object, wait_s: float = 0.0) -> DataWorkerKilled | None:
    """The one-line error for the first worker of a DataLoader iterator that has died (within `wait_s`:
    one dying may not have been reaped yet), if any."""
    deadline = time.monotonic() + wait_s
    while True:
        for worker in getattr(running, "_workers", []):
            if worker.exitcode not in (None, 0):
                return DataWorkerKilled(_death_line(worker.pid, worker.exitcode))
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _death_line(pid: int | str, exitcode: int | None) -> str:
    if exitcode is None:
        how = "exited unexpectedly"
    elif exitcode < 0:
        hint = ": out of memory?" if -exitcode == signal.SIGKILL else ""
        how = f"was killed (signal {-exitcode}{hint})"
    else:
        how = f"exited with status {exitcode}"
    return f"data worker pid {pid} {how}; run the same command to resume"


MAX_AUTO_WORKERS = 4  # data=webdataset's count before `auto`: enough to feed a GPU at these batch sizes


def worker_count(
    setting: int | str, shards_per_rank: int | None = None, local_ranks: int | None = None
) -> int:
    """data.num_workers as a count: as given, or for `auto` this rank's share of the cores the process may
    use (its CPU affinity: a SLURM task's own cores), at most MAX_AUTO_WORKERS and one per shard of the
    rank's (None: resampled, no limit), at least 1."""
    if setting != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_ranks = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's ranks here
    return max(1, min(MAX_AUTO_WORKERS, cores // local_ranks, shards_per_rank or MAX_AUTO_WORKERS))


class TrainLoader:
    """Endless `Batch`es. `epoch` = steps taken // `steps_per_epoch`. Its state: every slot's cursor."""

    def __init__(
        self,
        config: DataConfig,
        transform: Callable,
        tokenizer: Callable[[list[str]], torch.Tensor],
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        read_options: dict | None = None,
        reuse_buffers: bool = False,
    ) -> None:
        """`reuse_buffers`: a batch's images live in a buffer that a worker fills again once the next
        batch is asked for (vlmtrain.data.buffers); for a consumer that never keeps a batch longer."""
        specs = source_specs(config)
        self.sources = sources = [expand_shards(spec, key) for key, spec, _ in specs]
        self.source_keys = [key for key, _, _ in specs]
        fewest = None if config.resampled else min(len(shards) for shards in sources) // world_size
        num_workers = worker_count(config.num_workers, fewest)
        self.workers, self.world_size, self.rank = max(1, num_workers), world_size, rank
        for (key, _, _), shards in zip(specs, sources):
            if len(shards) < world_size * self.workers and not config.resampled:
                raise ConfigError(
                    f"{key}: {len(shards)} shards cannot feed {world_size} ranks x {self.workers} workers"
                )
        sizes = shard_sizes([shard for shards in sources for shard in shards])
        self.samples_per_epoch = epoch_samples(config, sources, sizes)
        self.steps_per_epoch = self.samples_per_epoch // (config.batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"data.batch_size: {config.batch_size} x {world_size} rank(s) is more than the "
                f"{self.samples_per_epoch} samples of an epoch (data.samples_per_epoch)"
            )
        weights = [weight for _, _, weight in specs]
        self.stream = ShardStream(
            sources,
            transform,
            tokenizer,
            config.batch_size,
            shuffle_buffer=config.shuffle_buffer,
            seed=seed,
            rank=rank,
            world_size=world_size,
            weights=weights,
            resampled=config.resampled,
            sizes=sizes,
            read_options=config_read_options(config) if read_options is None else read_options,
        )
        self.num_workers, self.pin_memory, self.reuse_buffers = num_workers, pin_memory, reuse_buffers
        self.batches = 0  # handed out on this rank (= steps taken)
        self.cursors: dict[int, Cursor] = {}  # this rank's slots, after the last batch each handed out
        self._handed: tuple[int, Cursor | None] | None = None  # the last batch's slot, its cursor before
        self.max_image_pixels = config.max_image_pixels
        self._running: object = None  # the DataLoader iterator while batches are handed out
        self._scratch: str | None = None  # the workers' temporary folder while they run
        # each wait for a batch runs inside this (the Trainer's: a stop signal ends the wait at once)
        self.waiting: Callable[[], AbstractContextManager] = nullcontext

    @property
    def epoch(self) -> int:
        return self.batches // self.steps_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        self.stream.cursors, self.stream.rotation = dict(self.cursors), self.batches % self.workers
        prefetch = 4
        buffers = BatchBuffers(self.num_workers, prefetch + 2) if self.reuse_buffers else None
        self.stream.buffers = buffers  # enough for the batches queued, the one in use and the one made
        # named as multiprocessing names its own: the workers' socket paths are no longer (108 bytes at most)
        self._scratch = tempfile.mkdtemp(prefix="pymp-") if self.num_workers else None
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=functools.partial(
                _start_worker,
                parent=os.getpid(),
                max_image_pixels=self.max_image_pixels,
                scratch=self._scratch,
            ),
            prefetch_factor=prefetch if self.num_workers else None,
        )
        if not self.num_workers:
            limit_image_pixels(self.max_image_pixels)
        self._running = iter(loader)
        if self.num_workers and threading.current_thread() is threading.main_thread():
            # torch's SIGCHLD handler raises a worker's death in whatever the process runs (a checkpoint
            # write, a log call that swallows it); without it, the next wait for a batch finds it
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        try:
            while True:
                with self.waiting():  # the wait alone: a batch is handed out whole or not at all
                    batch = self._next_batch()
                if batch is None:
                    return
                meta = batch["meta"]
                self._handed = (meta.slot, self.cursors.get(meta.slot))
                self.cursors[meta.slot] = meta.cursor
                self.batches += 1
                yield Batch(batch["images"], batch["tokens"], meta.keys)
                if buffers is not None:  # the consumer asks for the next batch: it is done with this one
                    buffers.release(*meta.buffer)
        except DataError as error:  # from a worker: its message comes wrapped in the worker's traceback
            raise DataError(worker_message(str(error))) from None
        finally:
            self.close()

    def _next_batch(self) -> dict | None:
        try:
            return next(self._running, None)
        except RuntimeError as error:  # torch: "DataLoader worker (pid(s) ...) exited unexpectedly"
            failed, death = error, _dead_worker(self._running)
        except (ConnectionError, EOFError) as error:  # a worker hands its batch's tensors over itself:
            failed, death = error, _dead_worker(self._running, wait_s=2.0)  # dying meanwhile, it resets
        if death is None:
            raise failed
        raise death from None

    def put_back(self) -> None:
        """Undo handing out the last batch, which no step used: the position is as before it."""
        if self._handed is None:
            return
        slot, before = self._handed
        if before is None:
            del self.cursors[slot]
        else:
            self.cursors[slot] = before
        self.batches, self._handed = self.batches - 1, None

    def close(self) -> None:
        """Stop the data workers now: killed, as what they hold is in no batch handed out yet. They
        ignore SIGTERM (the main process decides when to stop) and may be waiting on a read."""
        running, self._running = self._running, None
        scratch, self._scratch = self._scratch, None
        if running is not None and hasattr(running, "_shutdown_workers"):
            _stop_workers(running)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    def worst_shards(self) -> dict[str, int]:
        """This rank's shards with the most bad samples (url -> count), up to the last batch handed out."""
        return worst_shards([cursor.worst for cursor in self.cursors.values()])

    def bad_counts(self) -> dict[str, int]:
        """This rank's samples read and bad ones by reason, up to the last batch handed out."""
        return total([cursor.bad for cursor in self.cursors.values()])

    def state_dict(self) -> dict[str, Any]:
        """Every rank's cursors (a collective under DDP: every rank calls it, rank 0 saves it)."""
        cursors = {slot: cursor.to_dict() for slot, cursor in self.cursors.items()}
        if self.world_size > 1 and dist.is_initialized():
            gathered: list[dict] = [{} for _ in range(self.world_size)]
            dist.all_gather_object(gathered, cursors)
            cursors = {slot: cursor for part in gathered for slot, cursor in part.items()}
        return {
            "world_size": self.world_size,
            "workers": self.workers,
            "batches": self.batches,
            "cursors": cursors,
            "bad": total([cursor["bad"] for cursor in cursors.values()]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's cursors from the saved ones; saved by other ranks x workers, the position is shared
        out over this run's slots first (vlmtrain.data.reshard)."""
        if "cursors" not in state:
            raise ConfigError(
                "data: the checkpoint holds an older data position (epoch, batch) that cannot resume the "
                "stream exactly; start a new run_dir"
            )
        cursors = {int(slot): Cursor.from_dict(cursor) for slot, cursor in state["cursors"].items()}
        old = Layout(int(state["world_size"]), int(state["workers"]))
        if old != Layout(self.world_size, self.workers):
            cursors = self._reshard(cursors, old, int(state["batches"]))
        first = self.rank * self.workers
        self.batches = int(state["batches"])
        self.cursors = {
            slot: cursor for slot, cursor in cursors.items() if first <= slot < first + self.workers
        }

    def _reshard(self, cursors: dict[int, Cursor], old: Layout, batches: int) -> dict[int, Cursor]:
        """The saved slots' position shared out over this run's slots (vlmtrain.data.reshard)."""
        new = Layout(self.world_size, self.workers)
        stream = self.stream
        reading = Reading(stream.sources, stream.sizes, stream.seed, stream.resampled)
        if self.rank == 0:
            log.info(
                "data: the position of %d rank(s) x %d worker(s) is shared out over %d rank(s) x %d worker(s)",
                old.ranks,
                old.workers,
                new.ranks,
                new.workers,
            )
        return reshard(cursors, old, new, reading, batches=batches, steps_per_epoch=self.steps_per_epoch)

    def set_batch_size(self, batch_size: int) -> None:
        """The per-rank batch of a run resumed on another world size (the global batch kept)."""
        self.stream.batch_size = batch_size
        self.steps_per_epoch = self.samples_per_epoch // (batch_size * self.world_size)
