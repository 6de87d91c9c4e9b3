"""Autograd-aware collectives for the contrastive losses: all_gather and the neighbour (ring) exchange.

Each forward moves tensors between ranks; each backward sends the gradient of a received tensor back to
the rank that owns it, where it is summed with the gradients from every other rank's loss. With world
size 1 (or no process group) the gather is the identity and the ring yields nothing, so the losses run
one code path. Every rank must call these in the same order with tensors of the same shape and dtype.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_no_grad(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor`, in rank order, detached from the graph."""
    _, world = world_info()
    if world == 1:
        return [tensor.detach()]
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.detach().contiguous())
    return parts


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, _ = world_info()
        ctx.rows = tensor.shape[0]
        return torch.cat(all_gather_no_grad(tensor), dim=0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        # Each rank holds a gradient for every rank's rows; the owner needs the sum over ranks.
        # (all_reduce rather than reduce_scatter: gloo has no reduce_scatter.)
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce writes in place
        dist.all_reduce(grad)
        return grad.narrow(0, ctx.rank * ctx.rows, ctx.rows)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (B, ...) `tensor` along dim 0; gradients flow back to their owners."""
    if world_info()[1] == 1:
        return tensor
    return _AllGather.apply(tensor)


def _exchange(sends: list[tuple[torch.Tensor, int]], recv_from: list[int], like: torch.Tensor) -> list:
    """Post every send and receive at once (no ordering deadlock), then wait for all of them."""
    received = [torch.empty_like(like) for _ in recv_from]
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, buf, peer) for buf, peer in zip(received, recv_from)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _ShiftRight(torch.autograd.Function):
    """Send to the right neighbour, receive from the left; the gradient travels the other way."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        rank, world = world_info()
        ctx.left, ctx.right = (rank - 1) % world, (rank + 1) % world
        return _exchange([(tensor, ctx.right)], [ctx.left], tensor)[0]

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return _exchange([(grad, ctx.left)], [ctx.right], grad)[0]


class _ShiftBoth(torch.autograd.Function):
    """Send one tensor to each neighbour and receive one from each: (to_left, to_right) ->
    (from_left, from_right). The backward is the same exchange applied to the gradients: the gradient of
    what came from the left is owed to the left neighbour, which holds it as the gradient of its to_right."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, to_left: torch.Tensor, to_right: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rank, world = world_info()
        ctx.left, ctx.right = (rank - 1) % world, (rank + 1) % world
        from_left, from_right = _exchange(
            [(to_left, ctx.left), (to_right, ctx.right)], [ctx.left, ctx.right], to_left
        )
        return from_left, from_right

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_left: torch.Tensor, grad_right: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(
            _exchange([(grad_left, ctx.left), (grad_right, ctx.right)], [ctx.left, ctx.right], grad_left)
        )


def ring_exchange(tensor: torch.Tensor, bidirectional: bool = True) -> Iterator[torch.Tensor]:
    """Yield every other rank's `tensor` once, one neighbour hop at a time (world size - 1 tensors).

    Only neighbours talk, so each hop moves one block per link and nothing of global size is built.
    Bidirectional passes blocks both ways round the ring, halving the number of sequential hops.
    The generator must be run to the end on every rank: each step is a matched send/receive.
    """
    _, world = world_info()
    to_left = to_right = tensor
    hops_both = (world - 1) // 2 if bidirectional else 0
    for _ in range(hops_both):
        from_left, from_right = _ShiftBoth.apply(to_left, to_right)
        yield from_left
        yield from_right
        to_left, to_right = from_right, from_left  # keep each block moving the way it came
    for _ in range(world - 1 - 2 * hops_both):
        to_right = _ShiftRight.apply(to_right)
        yield to_right
