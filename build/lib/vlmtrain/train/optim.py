"""Optimizer with decoupled weight decay off for norms, biases, scalars; warmup + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or "norm" in name or ".ln" in name or "bias" in name or "logit_scale" in name


def adamw(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    betas: Sequence[float] = (0.9, 0.98),
    eps: float = 1e-6,
) -> torch.optim.AdamW:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
    ]
    # fused: one kernel for all parameters, several times faster than the per-tensor loop, same math
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 50, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the base lr, then cosine decay to `min_lr_ratio` x base lr at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def constant(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps))
    )
