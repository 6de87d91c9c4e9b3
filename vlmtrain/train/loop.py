"""The training loop, top to bottom: set up, resume, stream batches, step, log, checkpoint, evaluate."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlmtrain.checkpoint.manager import CheckpointManager
from vlmtrain.data.transforms import transforms_for
from vlmtrain.data.webdataset import DataConfig, train_loader
from vlmtrain.distributed.env import barrier, init_distributed
from vlmtrain.eval.suite import format_results, run_evals
from vlmtrain.launch.preemption import RunStopped, StopRequest
from vlmtrain.train.metrics import MetricLogger, Throughput, progress_line
from vlmtrain.train.state import TrainerConfig, TrainState
from vlmtrain.train.step import train_step

log = logging.getLogger("vlmtrain")


def train(
    model: nn.Module,
    loss_fn: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    make_scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler],
    data: DataConfig,
    trainer: TrainerConfig,
    run_dir: Path,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    stop: StopRequest | None = None,
) -> dict[str, float]:
    """Train until `trainer.max_steps`, resuming from `run_dir`'s latest checkpoint; return final eval.
    When `stop` catches a signal: save at the step boundary and raise RunStopped."""
    env = init_distributed(trainer.device)
    torch.manual_seed(seed)
    model.to(env.device)
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer)
    state = TrainState()
    checkpoints = CheckpointManager(run_dir / "checkpoints", trainer.keep_checkpoints)
    resume(checkpoints, model, optimizer, scheduler, state)

    tokenizer = model.text_encoder.tokenizer()
    train_transform, eval_transform, normalize = transforms_for(model.image_encoder, data.random_crop_scale)
    pin = env.device.type == "cuda"
    loader, stream, epoch_steps = train_loader(
        data, train_transform, tokenizer, seed, env.rank, env.world_size, pin_memory=pin
    )
    ddp = DistributedDataParallel(model) if env.world_size > 1 else model
    metrics = MetricLogger(run_dir, env.is_main, trainer.wandb, config or {}, trainer.wandb_project)
    speed = Throughput(state.step, trainer.max_steps)
    if env.is_main:
        log.info(
            "training from step %d to %d (about %s steps/epoch)", state.step, trainer.max_steps, epoch_steps
        )

    def save() -> None:
        if env.is_main:
            checkpoints.save(state.step, checkpoint_state(model, optimizer, scheduler, state, config))

    def evaluate() -> dict[str, float]:
        results = {}
        if env.is_main:  # the plain model, not DDP: no collectives, other ranks wait at the barrier
            results = run_evals(
                model, tokenizer, eval_transform, data.zeroshot_dir, data.val_shards, trainer.eval_batch_size
            )
            if results:
                metrics.log(state.step, results)
                log.info("eval at step %d\n%s", state.step, format_results(results))
        barrier()
        return results

    ddp.train()
    while state.step < trainer.max_steps:
        stream.set_epoch(state.epoch)
        waiting_since = time.perf_counter()
        for index, (images, tokens) in enumerate(loader):
            if index < state.batch_in_epoch:  # resumed mid-epoch: these batches were already trained on
                continue
            data_seconds = time.perf_counter() - waiting_since
            out = train_step(
                ddp,
                loss_fn,
                optimizer,
                scheduler,
                normalize(images.to(env.device, non_blocking=pin)),
                tokens.to(env.device, non_blocking=pin),
                trainer.grad_clip,
                trainer.precision,
                trainer.micro_batches,
            )
            state.step, state.batch_in_epoch = state.step + 1, index + 1
            state.samples_seen += images.shape[0] * env.world_size
            speed.add(images.shape[0] * env.world_size, data_seconds)
            if state.step % trainer.log_every == 0 or state.step == trainer.max_steps:
                out = {**out, "epoch": state.epoch, **speed.report(state.step)}
                metrics.log(state.step, out)
                if env.is_main:
                    log.info(progress_line(state.step, trainer.max_steps, out))
            if state.step % trainer.checkpoint_every == 0:
                save()
            if trainer.eval_every and state.step % trainer.eval_every == 0:
                evaluate()
            if state.step >= trainer.max_steps:
                break
            if stop and (signum := stop.agreed(env.device)):
                if state.step % trainer.checkpoint_every:  # else just saved
                    save()
                metrics.close()
                raise RunStopped(signum, state.step)
            waiting_since = time.perf_counter()
        else:
            if state.batch_in_epoch == 0:
                raise RuntimeError(
                    "data.train_shards: an epoch yielded no batch (fewer samples than one batch?)"
                )
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    save()
    results = evaluate()
    if env.is_main and results:
        (run_dir / "eval.json").write_text(json.dumps({"step": state.step, **results}, indent=1))
    metrics.close()
    return results


def checkpoint_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState, config: dict | None
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "train_state": state.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "config": config,
    }


def resume(
    checkpoints: CheckpointManager,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
) -> None:
    saved = checkpoints.load()
    if saved is None:
        return
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state.load_state_dict(saved["train_state"])
    torch.set_rng_state(saved["rng"]["torch"])
    if saved["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    log.info("resumed from %s at step %d", checkpoints.latest(), state.step)
