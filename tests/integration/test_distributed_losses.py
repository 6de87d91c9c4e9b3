"""Real gloo process groups on CPU: every loss, averaged over ranks the way DDP averages gradients, equals
single-process training on the concatenated batch, in value and in every gradient.

2 and 3 ranks run every loss (and open_clip's, which must agree rank by rank) plus tiny DDP-wrapped
models; 6 ranks check the ring alone (two bidirectional hops, then a one-way hop). Each world size is
spawned once; every rank runs all cases and saves its losses and gradients to a file. Inputs are float64
and built from a fixed seed, so each rank can slice its rows of the same global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests.helpers.ranks import fork_ranks
from tests.helpers.tiny import TEXT_W, VISION_W, D, H, K, TinyLlip, TinyTwoTower, oc
from vlmtrain.losses import ClipLoss, LlipLoss, SigLipLoss
from vlmtrain.losses.collectives import ring_exchange
from vlmtrain.models.llip_head import LlipHead
from vlmtrain.train.step import loss_and_backward

B = 3  # the local batch
F64 = torch.float64

LOSSES: dict[str, Callable[[int, int], nn.Module]] = {
    "clip_local": lambda rank, world: ClipLoss(local_loss=True, gather_with_grad=True),
    "clip_full": lambda rank, world: ClipLoss(local_loss=False, gather_with_grad=True),
    "clip_full_nograd": lambda rank, world: ClipLoss(local_loss=False, gather_with_grad=False),
    "siglip_bidir_chunk2": lambda rank, world: SigLipLoss(chunk_size=2, bidirectional=True),
    "siglip_shift": lambda rank, world: SigLipLoss(chunk_size=None, bidirectional=False),
    "openclip_clip_local": lambda rank, world: _OpenClip(
        oc.ClipLoss(True, True, rank=rank, world_size=world)
    ),
    "openclip_siglip_bidir": lambda rank, world: _OpenClip(oc.SigLipLoss(rank=rank, world_size=world)),
    "openclip_siglip_shift": lambda rank, world: _OpenClip(
        oc.SigLipLoss(rank=rank, world_size=world, dist_impl="shift")
    ),
    "llip_bidir_chunk2": lambda rank, world: LlipLoss(chunk_size=2, bidirectional=True),
    "llip_shift": lambda rank, world: LlipLoss(chunk_size=None, bidirectional=False),
}
SAME_PER_RANK = {  # open_clip's loss -> ours: same loss and gradients on every rank
    "openclip_clip_local": "clip_local",
    "openclip_siglip_bidir": "siglip_bidir_chunk2",
    "openclip_siglip_shift": "siglip_shift",
}


class _OpenClip(nn.Module):
    """open_clip's losses take the temperature already exp'd."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, **_):
        return self.loss(image_features, text_features, logit_scale.exp(), logit_bias)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rows() -> slice:
    """This rank's rows of the global batch; all of them without a process group."""
    if not dist.is_initialized():
        return slice(None)
    return slice(dist.get_rank() * B, (dist.get_rank() + 1) * B)


def _params() -> dict[str, torch.Tensor]:
    return {
        "logit_scale": torch.tensor(2.0, dtype=F64, requires_grad=True),
        "logit_bias": torch.tensor(-1.5, dtype=F64, requires_grad=True),
    }


def run_loss_case(name: str, n: int) -> tuple[float, dict[str, torch.Tensor]]:
    """The case's loss on this rank's rows of an n-pair global batch; gradients of inputs ('in:') and
    replicated parameters ('param:')."""
    g = _generator(0)
    rows = _rows()
    params = _params()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    loss_fn = LOSSES[name](rank, world)
    if name.startswith("llip"):
        head = LlipHead(VISION_W, TEXT_W, D, K, H).double()
        head.load_state_dict(
            {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in head.state_dict().items()}
        )
        inputs = {
            "tokens": torch.randn(n, K, VISION_W, generator=g, dtype=F64),
            "pooled": torch.randn(n, TEXT_W, generator=g, dtype=F64),
            "text": F.normalize(torch.randn(n, D, generator=g, dtype=F64), dim=-1),
        }
        inputs = {k: v[rows].clone().requires_grad_() for k, v in inputs.items()}
        keys, values = head.encode_image(inputs["tokens"])
        out = dict(image_keys=keys, image_values=values, text_queries=head.encode_text(inputs["pooled"]))
        out.update(
            text_features=inputs["text"], llip_out_proj=head.out_proj, llip_temperature=head.temperature
        )
        out.update(params)
        params.update(dict(head.named_parameters()))
    else:
        features = F.normalize(torch.randn(2, n, D, generator=g, dtype=F64), dim=-1)
        inputs = {"image": features[0][rows].clone().requires_grad_(), "text": features[1][rows].clone()}
        inputs["text"].requires_grad_()
        out = dict(image_features=inputs["image"], text_features=inputs["text"], **params)
    loss = loss_fn(**out)
    leaves = {f"in:{k}": v for k, v in inputs.items()} | {f"param:{k}": v for k, v in params.items()}
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return loss.item(), {
        k: torch.zeros_like(v) if gr is None else gr for (k, v), gr in zip(leaves.items(), grads)
    }


DDP_CASES = {  # name: (model, loss, micro-batches per rank)
    "ddp_clip": (TinyTwoTower, lambda: ClipLoss(), 1),
    "ddp_siglip": (TinyTwoTower, lambda: SigLipLoss(chunk_size=2), 1),
    "ddp_llip": (TinyLlip, lambda: LlipLoss(chunk_size=2), 1),
    "ddp_clip_micro3": (TinyTwoTower, lambda: ClipLoss(), 3),
    "ddp_llip_micro3": (TinyLlip, lambda: LlipLoss(chunk_size=2), 3),
}


def run_ddp_case(name: str, n: int, whole_batch: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    """One backward through a DDP-wrapped model (plain model at world size 1): parameter gradients.
    `whole_batch`: no micro-batches, whatever the case says."""
    model_cls, make_loss, micro_batches = DDP_CASES[name]
    torch.manual_seed(0)
    model = model_cls().double()
    g = _generator(1)
    images = (
        torch.randn(n, K, 5, generator=g, dtype=F64)
        if model_cls is TinyLlip
        else torch.randn(n, 5, dtype=F64, generator=g)
    )
    texts = torch.randn(n, 5, generator=g, dtype=F64)
    rows = _rows()
    wrapped = DistributedDataParallel(model) if dist.is_initialized() else model
    micro_batches = 1 if whole_batch else micro_batches
    loss = loss_and_backward(wrapped, make_loss(), images[rows], texts[rows], "fp32", micro_batches)
    return loss.item(), {f"param:{k}": p.grad.clone() for k, p in model.named_parameters()}


def run_ring(bidirectional: bool) -> tuple[list[int], torch.Tensor]:
    """The sources of the blocks that arrive, and the gradient that comes home when rank q weighs the
    block from rank s by (q + 1) * (s + 1): a gradient delivered to the wrong rank shows up in it."""
    rank = dist.get_rank()
    mine = torch.full((2, 3), float(rank), dtype=F64, requires_grad=True)
    received = list(ring_exchange(mine, bidirectional))
    sources = [int(block[0, 0].item()) for block in received]
    sum((rank + 1) * (src + 1) * block.sum() for src, block in zip(sources, received)).backward()
    return sources, mine.grad


def _expected_ring_grad(rank: int, world: int) -> float:
    return (rank + 1) * sum(q + 1 for q in range(world) if q != rank)


def _results(rank: int, world: int, ring_only: bool) -> dict:
    results = {"ring": {bidir: run_ring(bidir) for bidir in (True, False)}}
    if not ring_only:
        results |= {name: run_loss_case(name, world * B) for name in LOSSES}
        results |= {name: run_ddp_case(name, world * B) for name in DDP_CASES}
    return results


def _spawn(world: int, out_dir: Path, ring_only: bool = False) -> list[dict]:
    return fork_ranks(_results, world, out_dir, ring_only)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory) -> tuple[int, list[dict]]:
    return request.param, _spawn(request.param, tmp_path_factory.mktemp(f"world{request.param}"))


@pytest.fixture(scope="module")
def ring6_results(tmp_path_factory) -> list[dict]:
    """Six ranks: two bidirectional hops (the second sends different blocks each way), then a one-way hop."""
    return _spawn(6, tmp_path_factory.mktemp("ring6"), ring_only=True)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10, msg=lambda m: f"{what}: {m}")


def _assert_ddp_average(world: int, per_rank: list[tuple[float, dict]], expected: tuple[float, dict]) -> None:
    """Mean of the ranks' losses = the global loss; inputs: a rank's gradient / W = the global gradient of
    its rows (DDP divides by W after the owner has summed); parameters: the mean over ranks."""
    loss, grads = expected
    assert abs(sum(r[0] for r in per_rank) / world - loss) < 1e-10
    for key, full in grads.items():
        if key.startswith("in:"):
            got = torch.cat([r[1][key] for r in per_rank]) / world
        else:
            got = sum(r[1][key] for r in per_rank) / world
        _assert_close(got, full, key)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_matches_single_process(world_results, name):
    world, results = world_results
    _assert_ddp_average(world, [r[name] for r in results], run_loss_case(name, world * B))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SAME_PER_RANK))
def test_open_clip_agrees_on_every_rank(world_results, name):
    world, results = world_results
    for rank, result in enumerate(results):
        theirs, ours = result[name], result[SAME_PER_RANK[name]]
        assert abs(theirs[0] - ours[0]) < 1e-10, f"rank {rank}"
        for key in ("in:image", "in:text", "param:logit_scale"):
            _assert_close(ours[1][key], theirs[1][key], f"rank {rank} {key}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DDP_CASES))
def test_ddp_gradients_match_single_process(world_results, name):
    world, results = world_results
    loss, grads = run_ddp_case(name, world * B, whole_batch=True)
    assert abs(sum(r[name][0] for r in results) / world - loss) < 1e-10
    for rank, result in enumerate(results):  # DDP already averaged: every rank holds the same gradient
        for key, expected in grads.items():
            _assert_close(result[name][1][key], expected, f"rank {rank} {key}")


def _check_ring(world: int, results: list[dict], bidirectional: bool) -> None:
    for rank, result in enumerate(results):
        sources, grad = result["ring"][bidirectional]
        assert sorted(sources) == sorted(set(range(world)) - {rank})
        _assert_close(grad, torch.full_like(grad, _expected_ring_grad(rank, world)), f"rank {rank} grad")


@pytest.mark.slow
@pytest.mark.parametrize("bidirectional", [True, False])
def test_ring_delivers_blocks_and_gradients(world_results, bidirectional):
    _check_ring(*world_results, bidirectional)


@pytest.mark.slow
@pytest.mark.parametrize("bidirectional", [True, False])
def test_ring_with_six_ranks(ring6_results, bidirectional):
    _check_ring(6, ring6_results, bidirectional)
