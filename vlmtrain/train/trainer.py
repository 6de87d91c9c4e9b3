"""A training run in one object: built once from its config (environment, data, model, loss, optimizer,
schedule, checkpoints), then `train()` steps, logs, saves and evaluates, and `close()` lets go.

    with Trainer.from_config(cfg) as trainer:
        results = trainer.train()
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import TracebackType

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from vlmtrain.atomic import write_text_atomic
from vlmtrain.build import build, check_loss_fits_model
from vlmtrain.checkpoint.manager import CheckpointManager, CheckpointWriteError
from vlmtrain.checkpoint.policy import config_changes, describe, resumed_batch
from vlmtrain.checkpoint.sharded_manager import ShardedCheckpointManager
from vlmtrain.config_tree import typed_config
from vlmtrain.data.accounting import (
    COUNTS,
    DataError,
    bad_data_error,
    summary_line,
    too_many_bad,
    worst_shards,
)
from vlmtrain.data.fingerprint import fingerprint, resume_refusal
from vlmtrain.data.loader import Batch, TrainLoader, prepare_data, worker_death
from vlmtrain.data.transforms import transforms_for
from vlmtrain.distributed.agree import first_error
from vlmtrain.distributed.env import barrier, init_distributed
from vlmtrain.distributed.sharding import full_value, is_sharded, shard_for_training
from vlmtrain.distributed.stop import RunStopped, StopRequest, WaitInterrupted
from vlmtrain.dotted import flatten
from vlmtrain.eval.suite import eval_sets, format_results, run_evals
from vlmtrain.models.text_encoders import text_columns
from vlmtrain.report.plots import PLOT_FILE, write_run_plot
from vlmtrain.schema import ConfigError, RunConfig
from vlmtrain.train.garbage_collection import StepCollector
from vlmtrain.train.keylog import KeyLog
from vlmtrain.train.metrics import MetricLogger, Throughput
from vlmtrain.train.progress import Progress
from vlmtrain.train.run_lock import lock_run
from vlmtrain.train.state import RNGState, TrainState
from vlmtrain.train.status import RunStatus, error_line
from vlmtrain.train.step import NonFiniteError, StepResult, StepSettings, train_step, weights_finite

log = logging.getLogger("vlmtrain")


def warmup_warning(config: RunConfig) -> str | None:
    """A run that ends inside its warmup never trains at optim.lr: say so rather than run it silently."""
    warmup, max_steps = (config.schedule or {}).get("warmup_steps") or 0, config.trainer.max_steps
    if warmup < max_steps:
        return None
    return (
        f"schedule.warmup_steps={warmup} is not shorter than the run (trainer.max_steps={max_steps}): "
        "the learning rate never leaves warmup"
    )


def record_launch(run_dir: Path, config: RunConfig, resumed_from: Path | None) -> Path:
    """Keep every config the run was launched with: run_dir/configs/000.yaml, 001.yaml, ... (never
    overwritten)."""
    folder = run_dir / "configs"
    folder.mkdir(exist_ok=True)
    number = len(list(folder.glob("[0-9][0-9][0-9].yaml")))
    header = f"# launched {time.strftime('%Y-%m-%d %H:%M:%S')}, " + (
        f"resumed from {resumed_from.name}\n" if resumed_from else "a new run\n"
    )
    while True:
        try:
            with open(folder / f"{number:03d}.yaml", "x") as handle:
                handle.write(header + OmegaConf.to_yaml(dataclasses.asdict(config)))
            return folder / f"{number:03d}.yaml"
        except FileExistsError:
            number += 1


def blank_batch(size: int, image_size: int, tokenizer: Callable[[list[str]], torch.Tensor]) -> Batch:
    """Black images and empty captions, shaped as the loader's batches: what a rank whose loader failed
    before its first batch steps on, so that the step's collectives complete on every rank."""
    images = torch.zeros(size, 3, image_size, image_size, dtype=torch.uint8)
    return Batch(images, tokenizer([""] * size), [""] * size)


class Trainer:
    """One training run in `run_dir` (default `config.run_dir`).

    Construction builds, and writes nothing in the run directory but its lock: it starts the process
    group (under torchrun or SLURM), takes `run_dir/run.lock` (a second launch in the folder is refused),
    writes the synthetic dataset if the config names one (rank 0, on first use) and builds the model
    (under `trainer.parallel=fsdp` sharded over the ranks, before the optimizer), loss, optimizer,
    schedule, data loader and checkpoint manager (sharded step folders under fsdp); any config problem
    is a ConfigError here, before the first step.
    `start()` (called by `from_config`, else by `train()`) resumes, a step of its own (`resume()`: the
    newest readable checkpoint of the run directory, saved under either `trainer.parallel`, restores every
    part, or None for a new run; a config change that must not happen is refused), then wraps the model
    for DDP (ddp, several ranks) and records the launch:
    `configs/NNN.yaml`, `config.json`, and the metrics and key logs cut back to the checkpoint's step.
    `train()` steps to `trainer.max_steps`, logging, checkpointing and evaluating on the way, and returns
    the final evaluation (`_run_steps` shows every way a run can stop). `close()` waits for a checkpoint
    written in the background, then lets go of the data workers, logs, signal handlers and the run's
    lock."""

    def __init__(self, config: RunConfig, run_dir: str | Path | None = None) -> None:
        """Take the run's lock and build every part of the run (see the class); nothing is restored."""
        self.config = config
        self.run_dir = Path(run_dir or config.run_dir)
        self.env = init_distributed(config.trainer.device)
        # before anything is written or swept in the run folder; a launch refused here touches nothing
        self.lock = lock_run(self.run_dir, is_main=self.env.is_main, device=self.env.device)
        self.own_group = False  # a process group made to shard a single process: destroyed on close
        try:
            self._build()
        except BaseException:
            self._release_lock()
            self._release_group()
            raise

    def _build(self) -> None:
        config, trainer, env = self.config, self.config.trainer, self.env
        prepare_data(config.data, env.is_main)
        torch.manual_seed(config.seed)  # the initial weights are a function of the seed
        self.model = build(config.model, "model").to(env.device)
        if trainer.compile:  # in place, so state dicts and checkpoints keep their parameter names
            self.model.image_encoder.compile()
            self.model.text_encoder.compile()
        if trainer.parallel == "fsdp":  # before the optimizer: its parameters are the sharded ones
            self.own_group = shard_for_training(self.model, env.device, trainer.precision)
        self.loss_fn = build(config.loss, "loss")
        check_loss_fits_model(self.loss_fn, self.model)
        self.optimizer = build(config.optim, "optim")(self.model)
        self.scheduler = build(config.schedule, "schedule")(self.optimizer)
        self.tokenizer = self.model.text_encoder.tokenizer()
        train_transform, self.eval_transform, self.normalize = transforms_for(
            self.model.image_encoder, config.data.random_crop_scale
        )
        self.pin = env.device.type == "cuda"
        self.loader = TrainLoader(
            config.data,
            train_transform,
            self.tokenizer,
            config.seed,
            rank=env.rank,
            world_size=env.world_size,
            pin_memory=self.pin,
            reuse_buffers=True,  # a batch is not used past its step
        )
        self.state = TrainState()
        self.checkpoints = self._checkpoint_manager()
        self.skipped_in_a_row = 0
        self.stop = StopRequest()  # a signal saves at the next step boundary instead of killing
        self.loader.waiting = self.stop.interrupting  # or ends a wait for data at once
        self.progress = Progress(0, 0, enabled=False)  # the bar lives while train() steps
        self.status = RunStatus(self.run_dir, trainer.max_steps, env.is_main)
        self.resumed_from: Path | None = None
        self.ddp: torch.nn.Module = self.model
        self.metrics: MetricLogger | None = None  # opened by start()
        self.saved_shards: list[dict] | None = None  # the fingerprint in the checkpoint resumed from
        self.started = False

    def start(self) -> Trainer:
        """Resume from the newest checkpoint (if any), wrap the model for DDP and record the launch in the
        run directory; once, before the first step."""
        if self.started:
            return self
        self.resumed_from = self.resume()
        self._check_data()
        replicated = self.env.world_size > 1 and not is_sharded(self.model)  # sharded: FSDP syncs
        self.ddp = DistributedDataParallel(self.model) if replicated else self.model
        self._record_launch()
        self.started = True
        return self

    def resume(self) -> Path | None:
        """Restore every part from the run's newest readable checkpoint, of either `trainer.parallel`
        (a ddp run's file, a sharded run's folder), and return its path; None for a new run. A resume that
        changes what must stay is refused in one line (ConfigError)."""
        return self.checkpoints.resume(check=self._check_resume)

    def _record_launch(self) -> None:
        """configs/NNN.yaml and config.json (rank 0); the metrics and key logs, without the lines after
        the checkpoint's step (those steps are trained again)."""
        config, env = self.config, self.env
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if env.is_main:
            record_launch(self.run_dir, config, self.resumed_from)
        self.metrics = MetricLogger(
            self.run_dir,
            env.is_main,
            config.trainer.wandb,
            dataclasses.asdict(config),
            config.trainer.wandb_project,
        )
        self.keys = KeyLog(self.run_dir, env.rank, config.data.record_keys)
        if self.resumed_from:
            self.metrics.drop_after(self.state.step)
            self.keys.drop_after(self.state.step)
        if env.is_main:  # the resolved config, for `vlmtrain-runs` to compare runs by
            write_text_atomic(self.run_dir / "config.json", json.dumps(dataclasses.asdict(config), indent=1))

    def _checkpoint_manager(self) -> CheckpointManager:
        """Every stateful part, with the config and (rank 0, which saves) the shards' fingerprint."""
        config, env = self.config, self.env
        sharded = partial(ShardedCheckpointManager, asynchronous=config.trainer.async_checkpoint)
        manager = sharded if config.trainer.parallel == "fsdp" else CheckpointManager
        return manager(
            self.run_dir / "checkpoints",
            parts={
                "model": self.model,
                "optimizer": self.optimizer,
                "scheduler": self.scheduler,
                "train_state": self.state,
                "rng": RNGState(),
                "data": self.loader,
            },
            every=config.trainer.checkpoint_every,
            keep_last=config.trainer.keep_checkpoints,
            extra={
                "config": dataclasses.asdict(config),
                "world_size": env.world_size,
                "data_shards": fingerprint(self.loader.sources) if env.is_main else None,
            },
            writer=env.is_main,
        )

    def _check_resume(self, path: Path, saved: dict) -> None:
        """Refuse a resume that changes what must stay (one line naming the keys); log what is applied."""
        old = (saved.get("config") or {}) | {"world_size": saved.get("world_size", self.env.world_size)}
        self._keep_global_batch(old)
        new = dataclasses.asdict(self.config) | {"world_size": self.env.world_size}
        refused, applied = config_changes(old, new)
        if refused:
            raise ConfigError(
                f"{describe(refused)}: cannot change when resuming {self.run_dir} (saved in {path.name}); "
                "restore the saved values or start a new run_dir"
            )
        if applied and self.env.is_main:
            flat_old, flat_new = flatten(old), flatten(new)
            log.info(
                "resuming with %s", ", ".join(f"{k} {flat_old.get(k)} -> {flat_new.get(k)}" for k in applied)
            )
        self.saved_shards = saved.get("data_shards")

    def _keep_global_batch(self, old: dict) -> None:
        """On another world size, the per-rank batch (and micro-batches) that keep the checkpoint's global
        batch, or a ConfigError (vlmtrain.checkpoint.policy); applied to the loader and the saved config."""
        config = self.config
        batch, micro = resumed_batch(old, dataclasses.asdict(config) | {"world_size": self.env.world_size})
        if (batch, micro) == (config.data.batch_size, config.trainer.micro_batches):
            return
        self.config = dataclasses.replace(
            config,
            data=dataclasses.replace(config.data, batch_size=batch),
            trainer=dataclasses.replace(config.trainer, micro_batches=micro),
        )
        self.loader.set_batch_size(batch)
        self.checkpoints.extra["config"] = dataclasses.asdict(self.config)

    def _check_data(self) -> None:
        """Refuse to continue a data position in shards that changed since its checkpoint, unless
        data.allow_changed_shards (vlmtrain.data.fingerprint). Rank 0 compares (it fingerprinted the
        shards); every rank learns the answer (one collective, on every rank)."""
        refused = None
        if self.env.is_main and self.resumed_from and self.saved_shards is not None:
            refused = resume_refusal(
                self.saved_shards,
                self.checkpoints.extra["data_shards"],
                keys=self.loader.source_keys,
                checkpoint=self.resumed_from.name,
                allow=self.config.data.allow_changed_shards,
            )
        if (message := first_error(refused, self.env.device)) is not None:
            raise ConfigError(message)

    @classmethod
    def from_config(cls, cfg: DictConfig, run_dir: str | Path | None = None) -> Trainer:
        """A trainer built from the composed config and started (resumed, its launch recorded)."""
        trainer = cls(typed_config(cfg), run_dir)
        try:
            return trainer.start()
        except BaseException:
            trainer.close()
            raise

    def train(self) -> dict[str, float]:
        """Step until `trainer.max_steps`; return the final evaluation. On a stop signal: save at the step
        boundary and raise RunStopped (the same command resumes). `status.json` follows the run's state."""
        self.start()
        self.status.write("running", self.state.step)
        try:
            results = self._train()
        except RunStopped as stopped:
            self.status.write("stopped", stopped.step)
            raise
        except BaseException as error:
            death = worker_death(error)  # torch's words for a killed data worker, as one line
            self.status.write("failed", self.state.step, error_line(death or error))
            if death is not None:
                raise death from None
            raise
        self.status.write("finished", self.state.step)
        return results

    def _train(self) -> dict[str, float]:
        max_steps, state = self.config.trainer.max_steps, self.state
        self._announce()
        speed = Throughput(state.step, max_steps)
        self.progress = Progress(state.step, max_steps, self.env.is_main)
        with StepCollector(self.config.trainer.gc_every) as collector:
            self._run_steps(speed, collector)
        self._save(last=True)
        self.progress.close()
        counts = self._data_counts()  # on every rank: a collective
        if too_many_bad(counts, self.config.data.max_bad_fraction):
            raise self._bad_data(counts)
        if self.env.is_main:
            log.info(summary_line(counts))
        results = self.evaluate()
        if self.env.is_main and results:
            (self.run_dir / "eval.json").write_text(json.dumps({"step": state.step, **results}, indent=1))
        return results

    def _run_steps(self, speed: Throughput, collector: StepCollector) -> None:
        """Step to `trainer.max_steps`, logging, saving and evaluating on the way. Every way the run can stop
        is a `raise` in this loop, each at the same step on every rank: a rank's data failed, too much bad
        data, non-finite steps in a row, weights no longer finite or a checkpoint write that failed (when
        saving), a stop signal (saved at the step boundary, then RunStopped)."""
        max_steps, state = self.config.trainer.max_steps, self.state
        batches, batch = iter(self.loader), None
        self.ddp.train()
        while state.step < max_steps:
            waiting_since = time.perf_counter()
            batch, failed = self._fetch(batches, batch)
            speed.add(batch.images.shape[0] * self.env.world_size, time.perf_counter() - waiting_since)
            result = self._step(batch.images, batch.tokens, failed is not None)
            decided = result.decisions  # agreed by every rank in the step's one all-reduce
            if decided.data_failed and decided.stop:  # a rank's wait for data ended by a stop signal
                raise self._stopped_without_batch(failed, decided.stop)
            if decided.data_failed:  # the step updated nothing; the last checkpoint is the resume point
                raise self._data_failed(failed)
            state.step += 1
            state.samples_seen += batch.images.shape[0] * self.env.world_size
            self.keys.write(state.step, batch.keys)
            self.progress.advance()
            self._count_skips(decided.non_finite)
            counts = self._data_counts() if self._log_due() else None  # every rank: summed over the ranks
            if counts is not None and too_many_bad(counts, self.config.data.max_bad_fraction):
                raise self._bad_data(counts)
            self._log(result, counts, speed)
            if self.skipped_in_a_row >= self.config.trainer.max_skipped_steps:
                raise self._diverged()
            self._save()  # raises NonFiniteError (weights) or the agreed CheckpointWriteError
            collector.step(state.step)
            every = self.config.trainer.eval_every  # the last step's evaluation follows the loop
            if every and state.step % every == 0 and state.step < max_steps:
                self.evaluate()
            if state.step < max_steps and decided.stop:
                self._save(last=True)
                raise RunStopped(decided.stop, state.step)

    def _step(self, images: torch.Tensor, tokens: torch.Tensor, data_failed: bool) -> StepResult:
        device, trainer = self.env.device, self.config.trainer
        return train_step(
            self.ddp,
            self.loss_fn,
            self.optimizer,
            self.scheduler,
            self.normalize(images.to(device, non_blocking=self.pin)),
            self._text_tokens(tokens.to(device, non_blocking=self.pin), tokens),
            settings=StepSettings(trainer.grad_clip, trainer.precision, trainer.micro_batches),
            stop_signal=self.stop.signum,
            data_failed=data_failed,
        )

    def _text_tokens(self, moved: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The moved tokens' leading columns the text tower reads, counted on the host copy (no device
        sync); contiguous, as some Hugging Face models `view` their ids."""
        return moved[:, : text_columns(self.model.text_encoder, tokens)].contiguous()

    def _fetch(self, batches: Iterator[Batch], previous: Batch | None) -> tuple[Batch, str | None]:
        """The next batch and None. A stop signal ends the wait for it at once: alone, the run saves
        and stops here. Under DDP, when the loader raises or a signal ends the wait: a stand-in batch of
        the same shapes (the previous one, else blank) and why, as one line; this rank still runs the
        step, so the others are not left waiting in its collectives, and every rank stops after it."""
        try:
            return next(batches), None
        except WaitInterrupted:
            if self.env.world_size == 1:
                self._save(last=True)
                raise RunStopped(self.stop.signum, self.state.step) from None
            line = "stopped while waiting for data"
        except Exception as error:  # not BaseException: an interrupt or exit goes through
            if self.env.world_size == 1:
                raise  # no other rank to stop with it: the loader's own error, as it came
            if not isinstance(error, DataError):  # unexpected: its traceback, in this rank's log
                log.error("the data loader raised on rank %d", self.env.rank, exc_info=error)
            line = error_line(error).removeprefix(f"{DataError.__name__}: ")  # its own words suffice
        if previous is None:
            size = self.model.image_encoder.image_size
            previous = blank_batch(self.config.data.batch_size, size, self.tokenizer)
        return previous, f"data on rank {self.env.rank}: {line}"

    def _stopped_without_batch(self, failed: str | None, signum: int) -> RunStopped:
        """Some rank had no batch because a stop signal ended its wait for data, so this step updated
        nothing: the batches this step had go back, the run saves, and stops (a collective)."""
        if failed is None:
            self.loader.put_back()
        self._save(last=True)
        return RunStopped(signum, self.state.step)

    def _data_failed(self, failed: str | None) -> DataError:
        """Some rank's loader raised: the error every rank stops with, the same line on every rank naming
        the failing rank (the lowest, if several). A collective: every rank calls it."""
        return DataError(first_error(failed, self.env.device) or "data: a rank's loader failed")

    def _count_skips(self, skipped: bool) -> None:
        """Count a skipped step (every rank skips the same ones) and the skips in a row."""
        if not skipped:
            self.skipped_in_a_row = 0
            return
        self.state.skipped_steps += 1
        self.skipped_in_a_row += 1
        log.warning("step %d skipped: non-finite loss or gradients", self.state.step)

    def _diverged(self) -> NonFiniteError:
        limit = self.config.trainer.max_skipped_steps
        return NonFiniteError(
            f"trainer.max_skipped_steps: {limit} steps in a row had a non-finite loss or gradients "
            f"(to step {self.state.step}); {self._intact()}; lower optim.lr or check the data"
        )

    def _save(self, last: bool = False) -> None:
        """Checkpoint when due; weights that are no longer finite are never written. A write that fails
        (rank 0 writes) stops every rank with the same one-line error, agreed right after the write (a
        collective: every rank calls it at the same steps)."""
        if not self.checkpoints.due(self.state.step, last):
            return
        if not weights_finite(self.model):  # the same weights, so the same answer, on every rank
            raise NonFiniteError(
                f"weights are not finite at step {self.state.step}, not checkpointed; {self._intact()}; "
                "lower optim.lr"
            )
        failed = None
        try:
            self.checkpoints.save(self.state.step, last)
        except CheckpointWriteError as error:
            failed = str(error)
        if (message := first_error(failed, self.env.device)) is not None:
            raise CheckpointWriteError(message)

    def _intact(self) -> str:
        saved = self.checkpoints.saved_step
        return "no checkpoint written" if saved is None else f"the checkpoint of step {saved} is intact"

    def _log_due(self) -> bool:
        step, trainer = self.state.step, self.config.trainer
        return step % trainer.log_every == 0 or step == trainer.max_steps

    def _log(self, result: StepResult, data: dict[str, int] | None, speed: Throughput) -> None:
        """The step's metrics line and progress, when logging is due (`data`: the summed data counts)."""
        if data is None:
            return
        step = self.state.step
        out = {
            **result.metrics(),
            **self._temperature(),
            "skipped_steps": self.state.skipped_steps,
            "epoch": self.loader.epoch,
            **{f"data/{'bad_' if name != 'samples_read' else ''}{name}": n for name, n in data.items()},
            **speed.report(step),
        }
        self.metrics.log(step, out)
        self.progress.report(step, out)
        if self.env.is_main and step % (self.config.trainer.log_every * 10) == 0:
            self.status.write("running", step)

    def _data_counts(self) -> dict[str, int]:
        """Samples read and skipped by reason, summed over the ranks (a collective: every rank calls it at
        the same steps)."""
        mine = self.loader.bad_counts()
        counts = torch.tensor([mine[name] for name in COUNTS], dtype=torch.int64, device=self.env.device)
        if self.env.world_size > 1:
            torch.distributed.all_reduce(counts)
        return dict(zip(COUNTS, counts.tolist()))

    def _bad_data(self, counts: dict[str, int]) -> DataError:
        """The error every rank stops with when too many samples were bad, naming the worst shards over
        all ranks (a collective: `counts` are summed, so every rank calls it at the same step)."""
        tables = [self.loader.worst_shards()]
        if self.env.world_size > 1:
            tables = [None] * self.env.world_size
            torch.distributed.all_gather_object(tables, self.loader.worst_shards())
        return bad_data_error(counts, self.config.data.max_bad_fraction, worst_shards(tables))

    def _temperature(self) -> dict[str, float]:
        """The contrastive logits' scale (exp of the learnt log-scale) and, for sigmoid losses, bias
        (sharded: gathered, a collective)."""
        out = {"logit_scale": full_value(self.model.logit_scale.detach()).exp().item()}
        if getattr(self.model, "logit_bias", None) is not None:
            out["logit_bias"] = full_value(self.model.logit_bias.detach()).item()
        return out

    def _announce(self) -> None:
        if not self.env.is_main:
            return
        where = f"resumed from {self.resumed_from}" if self.resumed_from else "a new run"
        log.info("run directory %s (%s)", self.run_dir, where)
        log.info(
            "training from step %d to %d (%s steps/epoch)",
            self.state.step,
            self.config.trainer.max_steps,
            self.loader.steps_per_epoch,
        )
        if warning := warmup_warning(self.config):
            log.warning(warning)

    def evaluate(self) -> dict[str, float]:
        """The data config's evaluations with the plain model, every rank on its share of each set (a
        collective); rank 0 logs them."""
        data, batch = self.config.data, self.config.trainer.eval_batch_size
        zeroshot = eval_sets(data.zeroshot_dir, data.zeroshot, "zeroshot")
        retrieval = eval_sets(data.val_shards, data.retrieval, "retrieval")
        results = run_evals(
            self.model, self.tokenizer, self.eval_transform, zeroshot, retrieval, batch_size=batch
        )
        if self.env.is_main:
            if results:
                self.metrics.log(self.state.step, results)
                log.info("eval at step %d\n%s", self.state.step, format_results(results))
            self._plot()
        barrier()
        return results

    def _plot(self) -> None:
        """curves.png in the run directory; a figure that cannot be drawn is a warning, not a lost run."""
        if not self.config.trainer.plot_curves:
            return
        try:
            write_run_plot(self.run_dir)
        except Exception as error:
            log.warning("could not write %s: %s", self.run_dir / PLOT_FILE, error_line(error))

    def close(self) -> None:
        self.checkpoints.close()  # a checkpoint still written in the background first
        self.loader.close()
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()
        self.stop.restore()
        self._release_lock()
        self._release_group()

    def _release_group(self) -> None:
        if self.own_group:
            torch.distributed.destroy_process_group()
            self.own_group = False

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> Trainer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
