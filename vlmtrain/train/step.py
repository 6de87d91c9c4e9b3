"""One optimisation step: forward under autocast, loss, NaN guard, backward, clip, update, schedule."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

MAX_LOGIT_SCALE = math.log(100)


def autocast(device: torch.device, precision: str) -> torch.autocast | nullcontext:
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"trainer.precision: expected 'fp32' or 'bf16', got {precision!r}")


def train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    tokens: torch.Tensor,
    grad_clip: float | None,
    precision: str,
) -> dict[str, float]:
    optimizer.zero_grad(set_to_none=True)
    with autocast(images.device, precision):
        loss = loss_fn(**model(images, tokens))
    if not torch.isfinite(loss):  # skip the update rather than poison the weights
        scheduler.step()
        return {"loss": loss.item(), "skipped": 1.0}
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
    optimizer.step()
    scheduler.step()
    unwrapped = getattr(model, "module", model)
    with torch.no_grad():
        unwrapped.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0]}
