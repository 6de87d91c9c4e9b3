"""One optimisation step: forward under autocast (whole batch or micro-batches), loss, NaN guard,
backward, clip, update, schedule."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from vlmtrain.train.accumulate import accumulated_backward

MAX_LOGIT_SCALE = math.log(100)


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
    """The batch's loss, its gradients added to .grad unless it is not finite; with micro_batches > 1
    the model sees one micro-batch at a time and the loss still the whole batch (`accumulate`)."""
    if micro_batches > 1:
        return accumulated_backward(
            model, loss_fn, images, tokens, micro_batches, lambda: autocast(images.device, precision)
        )
    with autocast(images.device, precision):
        loss = loss_fn(**model(images, tokens))
    if torch.isfinite(loss):
        loss.backward()
    return loss.detach()


def train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    tokens: torch.Tensor,
    grad_clip: float | None,
    precision: str,
    micro_batches: int = 1,
) -> dict[str, float]:
    optimizer.zero_grad(set_to_none=True)
    loss = loss_and_backward(model, loss_fn, images, tokens, precision, micro_batches)
    if not torch.isfinite(loss):  # skip the update rather than poison the weights
        scheduler.step()
        return {"loss": loss.item(), "skipped": 1.0}
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
    optimizer.step()
    scheduler.step()
    unwrapped = getattr(model, "module", model)
    with torch.no_grad():
        unwrapped.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0]}
