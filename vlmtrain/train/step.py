"""One optimisation step: forward under autocast (whole batch or micro-batches), loss, backward, clip,
a non-finite guard agreed by every rank, update, schedule.

The backward always runs, even for a non-finite loss: under DDP a rank that left out its backward would
leave the others waiting in the gradient all-reduce (and, for the sigmoid losses, in the ring exchange).
Whether to update is then one flag all-reduced over the ranks (the loss or the gradient norm non-finite
on any rank), so every rank skips the same steps and the replicas never diverge. The same all-reduce
carries the stop signal a rank may have caught and whether a rank's loader failed (that rank stepped on a
stand-in batch), so a step costs one small collective, not three."""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from vlmtrain.distributed.agree import rank_max
from vlmtrain.distributed.sharding import full_value, is_sharded, local_value
from vlmtrain.train.accumulate import accumulated_backward

MAX_LOGIT_SCALE = math.log(100)


class NonFiniteError(RuntimeError):
    """Training cannot go on: too many non-finite steps in a row, or weights that are no longer finite."""


def autocast(device: torch.device, precision: str) -> torch.autocast | nullcontext:
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"trainer.precision: expected 'fp32' or 'bf16', got {precision!r}")


def loss_and_backward(
    model: nn.Module,
    loss_fn: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    precision: str,
    micro_batches: int = 1,
) -> torch.Tensor:
    """The batch's loss, its gradients added to .grad (even when not finite: see above); with micro_batches > 1
    the model sees one micro-batch at a time and the loss still the whole batch (`accumulate`)."""
    if micro_batches > 1:
        return accumulated_backward(
            model, loss_fn, images, tokens, micro_batches, lambda: autocast(images.device, precision)
        )
    with autocast(images.device, precision):
        loss = loss_fn(**model(images, tokens))
    loss.backward()
    return loss.detach()


def non_finite(*values: torch.Tensor) -> torch.Tensor:
    """1.0 if any of `values` has a non-finite entry, else 0.0 (on their device, no host sync)."""
    return torch.stack([(~torch.isfinite(v.detach().float())).any() for v in values]).any().float()


def weights_finite(model: nn.Module) -> bool:
    """Whether every parameter is finite (one device sync; sharded, each rank looks at its own pieces and
    the ranks agree: a collective)."""
    local = torch.stack([torch.isfinite(local_value(p.detach())).all() for p in model.parameters()]).all()
    if not is_sharded(model):
        return bool(local)
    return rank_max((~local).float().view(1))[0] == 0


@dataclass(frozen=True)
class StepSettings:
    """How a step runs (`trainer.grad_clip`, `trainer.precision`, `trainer.micro_batches`)."""

    grad_clip: float | None = None  # max gradient norm; None or 0: no clipping
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    micro_batches: int = 1


@dataclass(frozen=True)
class StepDecisions:
    """What every rank agreed on in the step's one all-reduce: the same values on every rank."""

    stop: int = 0  # the largest caught signal's number over the ranks; 0: none
    data_failed: bool = False  # some rank's loader raised: its batch only stood in, and the run stops
    non_finite: bool = False  # the loss or gradient norm was not finite on some rank: the update skipped


@dataclass(frozen=True)
class StepResult:
    """One step's numbers and the decisions its ranks agreed on."""

    loss: float
    grad_norm: float
    lr: float  # the rate this step used
    skipped: bool  # no update: non-finite on some rank, or some rank's data failed
    decisions: StepDecisions = field(default_factory=StepDecisions)

    def metrics(self) -> dict[str, float]:
        """The step's numbers as a metrics line holds them."""
        return {"loss": self.loss, "grad_norm": self.grad_norm, "lr": self.lr, "skipped": float(self.skipped)}


def train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    tokens: torch.Tensor,
    *,
    settings: StepSettings = StepSettings(),
    stop_signal: int = 0,
    data_failed: bool = False,
) -> StepResult:
    """One update, or none when the loss or gradients are not finite on any rank (`skipped`); the schedule
    advances either way, so a skipped step is a lost batch, not a shifted schedule. `decisions.stop` is the
    largest `stop_signal` (a caught signal's number, 0: none) over the ranks. `data_failed`: this rank's
    loader raised and `images`, `tokens` only stand in; if any rank says so, no rank updates nor advances
    the schedule (`decisions.data_failed`, `skipped`), as the run stops before this step."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_and_backward(model, loss_fn, images, tokens, settings.precision, settings.micro_batches)
    clip = settings.grad_clip if settings.grad_clip else float("inf")
    # sharded gradients: the norm is a sharded value whose full value is the whole model's norm
    grad_norm = full_value(nn.utils.clip_grad_norm_(model.parameters(), clip))
    flags = torch.tensor([float(stop_signal), float(data_failed)], device=loss.device)
    bad, stop, data = rank_max(torch.cat([non_finite(loss, grad_norm).view(1), flags]))
    decisions = StepDecisions(stop=int(stop), data_failed=data > 0, non_finite=bad > 0)
    skipped = decisions.non_finite or decisions.data_failed
    if skipped:  # skip the update rather than poison the weights (or learn from a stand-in batch)
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
        unwrapped = getattr(model, "module", model)
        with torch.no_grad():
            unwrapped.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    lr = scheduler.get_last_lr()[0]  # the rate this step used
    if not decisions.data_failed:  # a step the run will take again after a resume: its schedule stays
        with warnings.catch_warnings():  # a skipped step advances the schedule without an optimizer step
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()`")
            scheduler.step()
    return StepResult(loss.item(), grad_norm.item(), lr, skipped, decisions)
