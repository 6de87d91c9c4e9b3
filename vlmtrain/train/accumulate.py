"""Gradient accumulation that keeps every negative: the loss sees the whole batch, activations one
micro-batch at a time.

Splitting a contrastive batch into micro-batches and summing their losses would score each caption only
against its own micro-batch's images. Instead (GradCache, Gao et al. 2021):

1. every micro-batch goes through the model without a graph, and the per-sample outputs are joined;
2. the loss is taken on the whole batch, with its gradients for those outputs and for the parameters it
   reads directly (the temperature, the bias, the Llip output projection), not yet written to .grad;
3. each micro-batch goes through the model again, with a graph and the random state it had in 1, and its
   outputs are backpropagated with their slice of those gradients. Under DDP and FSDP only the last
   micro-batch synchronises, and it also carries the loss's direct parameter gradients.

The gradients are those of one step on the whole batch; the price is one more forward per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from vlmtrain.distributed.sharding import sync_gradients

Outputs = dict[str, object]


def _split(outputs: Outputs) -> tuple[list[str], dict[str, object]]:
    """Per-sample output keys (tensors with a batch dimension) and the shared rest (parameters, floats)."""
    per_sample = [
        k for k, v in outputs.items() if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter)
    ]
    return per_sample, {k: v for k, v in outputs.items() if k not in per_sample}


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def accumulated_backward(
    model: nn.Module,
    loss_fn: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    micro_batches: int,
    autocast: Callable[[], AbstractContextManager],
) -> torch.Tensor:
    """The whole batch's loss; gradients added to .grad (non-finite ones too: the step decides)."""
    inputs = list(zip(images.chunk(micro_batches), tokens.chunk(micro_batches)))
    unwrapped = getattr(model, "module", model)  # no DDP bookkeeping for the graph-free pass
    states, cached = [], []
    with torch.no_grad():
        for micro_images, micro_tokens in inputs:
            states.append(_rng_state(images.device))
            with autocast():
                cached.append(unwrapped(micro_images, micro_tokens))
    per_sample, shared = _split(cached[0])
    joined = {k: torch.cat([c[k] for c in cached]).requires_grad_() for k in per_sample}
    params = {k: v for k, v in shared.items() if isinstance(v, nn.Parameter) and v.requires_grad}
    with autocast():
        loss = loss_fn(**joined, **shared)
    grads = torch.autograd.grad(loss, [*joined.values(), *params.values()], allow_unused=True)
    sample_grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(joined.items(), grads)}
    param_grads = [
        torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads[len(joined) :])
    ]
    sizes = [micro_images.shape[0] for micro_images, _ in inputs]
    slices = {k: g.split(sizes) for k, g in sample_grads.items()}
    for index, (micro_images, micro_tokens) in enumerate(inputs):
        last = index == len(inputs) - 1
        with sync_gradients(model, last):
            _set_rng_state(images.device, states[index])
            with autocast():
                out = model(micro_images, micro_tokens)
            tensors = [out[k] for k in per_sample] + (list(params.values()) if last else [])
            gradients = [slices[k][index] for k in per_sample] + (param_grads if last else [])
            torch.autograd.backward(tensors, gradients)
    return loss.detach()
