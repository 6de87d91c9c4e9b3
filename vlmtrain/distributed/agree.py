"""Decisions every rank takes together, each one small all-reduce: the same answer on every rank, so no
rank goes on (or waits in a collective) while another stops."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_max(values: torch.Tensor) -> list[float]:
    """Each entry of the small tensor `values` maxed over every rank, as numbers (one all-reduce, one
    host sync); the values themselves without a process group."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.tolist()


def first_error(message: str | None, device: torch.device) -> str | None:
    """The error of the lowest rank that failed (`message` not None), the same on every rank; None when
    no rank failed. One all-reduce, and a broadcast of the message only when some rank failed."""
    if not dist.is_initialized():
        return message
    world = dist.get_world_size()
    failed = torch.tensor([dist.get_rank() if message is not None else world], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MIN)
    source = int(failed.item())
    if source == world:
        return None
    box = [message]
    dist.broadcast_object_list(box, src=source, device=device)
    return box[0]
