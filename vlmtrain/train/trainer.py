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
from pathlib import Path
from types import TracebackType

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.nn.parallel import DistributedDataParallel

from vlmtrain.build import build, check_loss_fits_model
from vlmtrain.checkpoint.manager import CheckpointManager, CheckpointWriteError
from vlmtrain.checkpoint.policy import config_changes, describe, flatten
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
from vlmtrain.distributed.stop import RunStopped, StopRequest, WaitInterrupted
from vlmtrain.eval.suite import eval_sets, format_results, run_evals
from vlmtrain.models.text_encoders import text_columns
from vlmtrain.schema import ConfigError, RunConfig, check_run, one_line
from vlmtrain.train.collect import StepCollector
from vlmtrain.train.keylog import KeyLog
from vlmtrain.train.metrics import MetricLogger, Throughput
from vlmtrain.train.plots import PLOT_FILE, write_run_plot
from vlmtrain.train.progress import Progress
from vlmtrain.train.run_lock import lock_run
from vlmtrain.train.state import RNGState, TrainState
from vlmtrain.train.status import RunStatus, error_line, write_atomic
from vlmtrain.train.step import NonFiniteError, train_step, weights_finite

log = logging.getLogger("vlmtrain")
COMPONENTS = ("model", "loss", "optim", "schedule")  # built from their `_target_`


def typed_config(cfg: DictConfig) -> RunConfig:
    """The composed config as a RunConfig (interpolations resolved, field checks run), or one line.
    Component nodes stay plain dicts holding every key given, so a constructor rejects what it does not take."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        run = OmegaConf.to_object(merged)
        for key in COMPONENTS:
            setattr(run, key, OmegaConf.to_container(merged[key], resolve=True))
    except OmegaConfBaseException as error:
        raise ConfigError(one_line(str(error))) from None
    check_run(run)
    return run


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
    def __init__(self, config: RunConfig, run_dir: str | Path | None = None) -> None:
        """Build every part of the run in `run_dir` (default `config.run_dir`) and restore its latest
        checkpoint; any config problem is a ConfigError before the first step."""
        self.config = config
        self.run_dir = Path(run_dir or config.run_dir)
        self.env = init_distributed(config.trainer.device)
        # before anything is written or swept in the run folder; a launch refused here touches nothing
        self.lock = lock_run(self.run_dir, is_main=self.env.is_main, device=self.env.device)
        try:
            self._build()
        except BaseException:
            self._release_lock()
            raise

    def _build(self) -> None:
        config, trainer, env = self.config, self.config.trainer, self.env
        prepare_data(config.data, env.is_main)
        torch.manual_seed(config.seed)  # the initial weights are a function of the seed
        self.model = build(config.model, "model").to(env.device)
        if trainer.compile:  # in place, so state dicts and checkpoints keep their parameter names
            self.model.image_encoder.compile()
            self.model.text_encoder.compile()
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
            env.rank,
            env.world_size,
            self.pin,
            reuse_buffers=True,  # a batch is not used past its step
        )
        self.state = TrainState()
        self.checkpoints = self._checkpoint_manager()
        self.saved_shards: list[dict] | None = None  # the fingerprint in the checkpoint resumed from
        self.resumed_from = self.checkpoints.resume(check=self._check_resume)
        self._check_data()
        self.ddp = DistributedDataParallel(self.model) if env.world_size > 1 else self.model
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if env.is_main:
            record_launch(self.run_dir, config, self.resumed_from)
        self.metrics = MetricLogger(
            self.run_dir, env.is_main, trainer.wandb, dataclasses.asdict(config), trainer.wandb_project
        )
        self.keys = KeyLog(self.run_dir, env.rank, config.data.record_keys)
        if self.resumed_from:  # the steps after the checkpoint are trained again
            self.metrics.drop_after(self.state.step)
            self.keys.drop_after(self.state.step)
        self.skipped_in_a_row = 0
        self.stop = StopRequest()  # a signal saves at the next step boundary instead of killing
        self.loader.waiting = self.stop.interrupting  # or ends a wait for data at once
        self.progress = Progress(0, 0, enabled=False)  # the bar lives while train() steps
        self.status = RunStatus(self.run_dir, trainer.max_steps, env.is_main)
        if env.is_main:  # the resolved config, for `vlmtrain-runs` to compare runs by
            write_atomic(self.run_dir / "config.json", json.dumps(dataclasses.asdict(config), indent=1))

    def _checkpoint_manager(self) -> CheckpointManager:
        """Every stateful part, with the config and (rank 0, which saves) the shards' fingerprint."""
        config, env = self.config, self.env
        return CheckpointManager(
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
        new = dataclasses.asdict(self.config) | {"world_size": self.env.world_size}
        old = (saved.get("config") or {}) | {"world_size": saved.get("world_size", self.env.world_size)}
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
        return cls(typed_config(cfg), run_dir)

    def train(self) -> dict[str, float]:
        """Step until `trainer.max_steps`; return the final evaluation. On a stop signal: save at the step
        boundary and raise RunStopped (the same command resumes). `status.json` follows the run's state."""
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
        if self.env.is_main:
            log.info(summary_line(counts))
        results = self.evaluate()
        if self.env.is_main and results:
            (self.run_dir / "eval.json").write_text(json.dumps({"step": state.step, **results}, indent=1))
        return results

    def _run_steps(self, speed: Throughput, collector: StepCollector) -> None:
        """Step to `trainer.max_steps`, logging, saving and evaluating on the way; on a stop signal, save
        at the step boundary and raise RunStopped."""
        max_steps, state = self.config.trainer.max_steps, self.state
        batches, batch = iter(self.loader), None
        self.ddp.train()
        while state.step < max_steps:
            waiting_since = time.perf_counter()
            batch, failed = self._fetch(batches, batch)
            speed.add(batch.images.shape[0] * self.env.world_size, time.perf_counter() - waiting_since)
            out = self._step(batch.images, batch.tokens, failed is not None)
            signum = int(out.pop("stop"))
            if out.pop("data_failed"):  # agreed by every rank in the step's all-reduce, as is the stop
                self._data_failed(failed, signum)
            state.step += 1
            state.samples_seen += batch.images.shape[0] * self.env.world_size
            self.keys.write(state.step, batch.keys)
            self.progress.advance()
            self._count_skips(out)
            self._log(out, speed)
            self._stop_if_diverged()
            self._save()
            collector.step(state.step)
            every = self.config.trainer.eval_every  # the last step's evaluation follows the loop
            if every and state.step % every == 0 and state.step < max_steps:
                self.evaluate()
            if state.step < max_steps and signum:
                self._save(last=True)
                raise RunStopped(signum, state.step)

    def _step(self, images: torch.Tensor, tokens: torch.Tensor, data_failed: bool) -> dict[str, float]:
        device, trainer = self.env.device, self.config.trainer
        return train_step(
            self.ddp,
            self.loss_fn,
            self.optimizer,
            self.scheduler,
            self.normalize(images.to(device, non_blocking=self.pin)),
            self._text_tokens(tokens.to(device, non_blocking=self.pin), tokens),
            trainer.grad_clip,
            trainer.precision,
            trainer.micro_batches,
            self.stop.signum,
            data_failed,
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

    def _data_failed(self, failed: str | None, signum: int) -> None:
        """Some rank had no batch, so this step updated nothing. With a stop signal (a rank's wait for
        data ended by it): the batches this step had go back, the run saves and stops. Else every rank
        stops with the same line naming the failing rank (the lowest, if several); the last checkpoint
        is the resume point."""
        if signum:
            if failed is None:
                self.loader.put_back()
            self._save(last=True)
            raise RunStopped(signum, self.state.step)
        raise DataError(first_error(failed, self.env.device) or "data: a rank's loader failed")

    def _count_skips(self, out: dict[str, float]) -> None:
        """Count a skipped step (every rank skips the same ones) and the skips in a row."""
        if not out["skipped"]:
            self.skipped_in_a_row = 0
            return
        self.state.skipped_steps += 1
        self.skipped_in_a_row += 1
        log.warning("step %d skipped: non-finite loss or gradients", self.state.step)

    def _stop_if_diverged(self) -> None:
        limit = self.config.trainer.max_skipped_steps
        if self.skipped_in_a_row >= limit:
            raise NonFiniteError(
                f"trainer.max_skipped_steps: {limit} steps in a row had a non-finite loss or gradients "
                f"(to step {self.state.step}); {self._intact()}; lower optim.lr or check the data"
            )

    def _save(self, last: bool = False) -> None:
        """Checkpoint when due; weights that are no longer finite are never written. A write that fails
        (rank 0 writes) stops every rank with the same one-line error, agreed right after the write."""
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

    def _log(self, out: dict[str, float], speed: Throughput) -> None:
        step, max_steps = self.state.step, self.config.trainer.max_steps
        if step % self.config.trainer.log_every and step != max_steps:
            return
        data = self._data_counts()
        out = {
            **out,
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
        """Samples read and skipped by reason, summed over the ranks (every rank calls it at the same
        steps); too many bad samples stop every rank here, at the same step."""
        mine = self.loader.bad_counts()
        counts = torch.tensor([mine[name] for name in COUNTS], dtype=torch.int64, device=self.env.device)
        if self.env.world_size > 1:
            torch.distributed.all_reduce(counts)
        summed, limit = dict(zip(COUNTS, counts.tolist())), self.config.data.max_bad_fraction
        if too_many_bad(summed, limit):  # the same answer on every rank: all gather the worst shards
            tables = [self.loader.worst_shards()]
            if self.env.world_size > 1:
                tables = [None] * self.env.world_size
                torch.distributed.all_gather_object(tables, self.loader.worst_shards())
            raise bad_data_error(summed, limit, worst_shards(tables))
        return summed

    def _temperature(self) -> dict[str, float]:
        """The contrastive logits' scale (exp of the learnt log-scale) and, for sigmoid losses, bias."""
        out = {"logit_scale": self.model.logit_scale.detach().exp().item()}
        if getattr(self.model, "logit_bias", None) is not None:
            out["logit_bias"] = self.model.logit_bias.detach().item()
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
        """The data config's evaluations, on rank 0 with the plain model; the other ranks wait."""
        results: dict[str, float] = {}
        if self.env.is_main:
            data, batch = self.config.data, self.config.trainer.eval_batch_size
            zeroshot = eval_sets(data.zeroshot_dir, data.zeroshot, "zeroshot")
            retrieval = eval_sets(data.val_shards, data.retrieval, "retrieval")
            results = run_evals(self.model, self.tokenizer, self.eval_transform, zeroshot, retrieval, batch)
            if results:
                self.metrics.log(self.state.step, results)
                log.info("eval at step %d\n%s", self.state.step, format_results(results))
            self._plot()
        barrier()
        return results

    def _plot(self) -> None:
        """curves.png in the run directory; a figure that cannot be drawn is a warning, not a lost run."""
        try:
            write_run_plot(self.run_dir)
        except Exception as error:
            log.warning("could not write %s: %s", self.run_dir / PLOT_FILE, error_line(error))

    def close(self) -> None:
        self.loader.close()
        self.progress.close()
        self.metrics.close()
        self.stop.restore()
        self._release_lock()

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
