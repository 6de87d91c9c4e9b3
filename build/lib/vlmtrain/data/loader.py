"""The data a training run reads: checked before the first step, streamed epoch after epoch, and a
position (`state_dict`) that the checkpoint manager saves so a resumed run continues at the next batch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vlmtrain.data.shards import expand_shards, shard_sizes
from vlmtrain.data.synthetic import ensure_synthetic
from vlmtrain.data.webdataset import ShardStream
from vlmtrain.distributed.env import barrier
from vlmtrain.distributed.stop import ignore_stop_signals
from vlmtrain.schema import ConfigError, DataConfig

log = logging.getLogger("vlmtrain")
Batch = tuple[torch.Tensor, torch.Tensor]


def prepare_data(config: DataConfig, is_main: bool) -> None:
    """Write the synthetic dataset on first use (rank 0), then check that every shard path exists."""
    if config.synthetic is not None:
        if is_main:
            ensure_synthetic(**vars(config.synthetic))
        barrier()
    expand_shards(config.train_shards, "data.train_shards")
    if config.val_shards:
        expand_shards(config.val_shards, "data.val_shards")
    if config.zeroshot_dir and not Path(config.zeroshot_dir).expanduser().is_dir():
        raise FileNotFoundError(f"data.zeroshot_dir: no such directory {config.zeroshot_dir}")


class TrainLoader:
    """Endless (images uint8, tokens) batches, epoch after epoch. Its state is the epoch and the batches
    of it already handed out; a loader restored from it skips those batches."""

    def __init__(
        self,
        config: DataConfig,
        transform: Callable,
        tokenizer: Callable[[list[str]], torch.Tensor],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        shards = expand_shards(config.train_shards, "data.train_shards")
        workers = max(1, config.num_workers)
        if len(shards) < world_size * workers:
            raise ConfigError(
                f"data.train_shards: {len(shards)} shards cannot feed {world_size} ranks x {workers} workers"
            )
        sizes = shard_sizes(shards)
        self.stream = ShardStream(
            shards,
            transform,
            tokenizer,
            config.batch_size,
            config.shuffle_buffer,
            seed,
            rank,
            world_size,
            sizes,
        )
        self.loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=config.num_workers,
            persistent_workers=False,
            pin_memory=pin_memory,
            worker_init_fn=ignore_stop_signals,  # the main process saves and stops the run
            prefetch_factor=4 if config.num_workers else None,
        )
        self.steps_per_epoch = (
            None if sizes is None else sum(sizes.values()) // (config.batch_size * world_size)
        )
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"data.batch_size: {config.batch_size} x {world_size} rank(s) is more than the "
                f"{sum(sizes.values())} samples in data.train_shards"
            )
        self.epoch, self.batch_in_epoch = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])

    def __iter__(self) -> Iterator[Batch]:
        while True:
            self.stream.set_epoch(self.epoch)
            for index, batch in enumerate(self.loader):
                if index < self.batch_in_epoch:  # resumed mid-epoch: already trained on (decoded again)
                    continue
                self.batch_in_epoch = index + 1
                yield batch
            if self.batch_in_epoch == 0:
                raise RuntimeError(
                    "data.train_shards: an epoch yielded no batch (fewer samples than one batch?)"
                )
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
