"""2 real gloo ranks, a non-finite value on one rank for one step: both ranks skip that step (no hang in
the gradient all-reduce or the sigmoid losses' ring exchange), training goes on, and the weights equal
those of a run that left that batch out.

Each loss is run twice per rank with the real `train_step`: once with rank 1's images NaN at step 2,
once skipping step 2's batch by hand. A last case keeps the loss finite and makes only a gradient NaN.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests.helpers.ranks import fork_ranks
from tests.helpers.tiny import TinyLlip, TinyTwoTower
from vlmtrain.losses import ClipLoss, LlipLoss, SigLipLoss
from vlmtrain.train.step import StepSettings, train_step

B, STEPS, BAD_STEP, BAD_RANK = 3, 5, 2, 1
SIGNAL, SIGNAL_RANK, SIGNAL_STEP = 15, 0, 3  # a stop signal one rank caught before this step


class GradTrap(TinyTwoTower):
    """Adds 0 * sqrt(scale * |images|): zero, so the loss stays finite, but a zero image row makes the
    gradient of `scale` 0 * inf = NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict:
        out = super().forward(images, texts)
        trap = 0 * torch.sqrt(self.scale * images.abs().sum(-1, keepdim=True))
        return out | {"image_features": out["image_features"] + trap}


CASES = {  # name: (model, loss, micro-batches, what the bad rank's images become at the bad step)
    "clip": (TinyTwoTower, ClipLoss, 1, "nan"),
    "siglip": (TinyTwoTower, lambda: SigLipLoss(chunk_size=2), 1, "nan"),
    "llip": (TinyLlip, lambda: LlipLoss(chunk_size=2), 1, "nan"),
    "llip_micro3": (TinyLlip, lambda: LlipLoss(chunk_size=2), 3, "nan"),
    "clip_nan_grad_only": (GradTrap, ClipLoss, 1, "zero"),
}


def _batch(model_cls: type, step: int, rank: int, bad: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    shape = (2 * B, 4, 5) if model_cls is TinyLlip else (2 * B, 5)
    images, texts = torch.randn(shape, generator=g), torch.randn(2 * B, 5, generator=g)
    images, texts = images[rank * B : (rank + 1) * B].clone(), texts[rank * B : (rank + 1) * B]
    if bad and step == BAD_STEP and rank == BAD_RANK:
        images[0] = float("nan") if bad == "nan" else 0.0
    return images, texts


def _train(name: str, rank: int, inject: bool) -> dict:
    model_cls, make_loss, micro_batches, bad = CASES[name]
    torch.manual_seed(0)
    model = model_cls()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss_fn, skipped, losses, stops, reduces = make_loss(), [], [], [], []
    for step in range(STEPS):
        images, texts = _batch(model_cls, step, rank, bad if inject else None)
        if step == BAD_STEP and not inject:  # the reference leaves this batch out
            scheduler.step()
            continue
        signal = SIGNAL if (rank, step) == (SIGNAL_RANK, SIGNAL_STEP) else 0  # caught by one rank only
        with counted_all_reduces() as count:
            settings = StepSettings(grad_clip=1.0, precision="fp32", micro_batches=micro_batches)
            out = train_step(
                ddp, loss_fn, optimizer, scheduler, images, texts, settings=settings, stop_signal=signal
            )
        skipped.append(float(out.skipped))
        losses.append(out.loss)
        stops.append(float(out.decisions.stop))
        reduces.append(count[0])
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"skipped": skipped, "losses": losses, "weights": weights, "stops": stops, "reduces": reduces}


@contextmanager
def counted_all_reduces() -> Iterator[list[int]]:
    """How many all-reduces the step's own decisions take: those not called by the losses' collectives
    (their gathers' backward) nor by DDP (its gradient buckets go through its reducer)."""
    count, real = [0], dist.all_reduce

    def counting(*args: object, **kwargs: object) -> object:
        if not sys._getframe(1).f_globals["__name__"].startswith("vlmtrain.losses."):
            count[0] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counting
    try:
        yield count
    finally:
        dist.all_reduce = real


def _results(rank: int, world: int) -> dict:
    return {name: {inject: _train(name, rank, inject) for inject in (True, False)} for name in CASES}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return fork_ranks(_results, 2, tmp_path_factory.mktemp("nonfinite"), timeout_s=120)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_one_rank_non_finite_is_skipped_on_both_and_equals_leaving_the_batch_out(results, name):
    expected_skips = [float(step == BAD_STEP) for step in range(STEPS)]
    for rank, result in enumerate(results):
        injected, reference = result[name][True], result[name][False]
        assert injected["skipped"] == expected_skips, f"rank {rank}"
        assert reference["skipped"] == [0.0] * (STEPS - 1)
        for key, value in reference["weights"].items():
            assert torch.isfinite(value).all()
            assert torch.equal(injected["weights"][key], value), f"rank {rank} {key}"
            assert torch.equal(results[0][name][True]["weights"][key], value), f"ranks differ: {key}"


@pytest.mark.slow
def test_one_all_reduce_per_step_carries_the_skip_and_the_stop(results):
    """The non-finite flag and a stop signal caught by one rank travel in the step's single all-reduce:
    every rank learns of the signal at the same step."""
    for name in CASES:
        for result in results:
            injected = result[name][True]
            assert injected["reduces"] == [1] * STEPS
            assert injected["stops"] == [float(SIGNAL if s == SIGNAL_STEP else 0) for s in range(STEPS)]


@pytest.mark.slow
def test_the_non_finite_value_was_on_one_rank_only(results):
    """The sigmoid losses keep image tensors on their rank: only the bad rank's loss is NaN, the case
    that used to hang; a NaN gradient alone leaves every loss finite."""
    for name in ("siglip", "llip"):
        losses = [result[name][True]["losses"][BAD_STEP] for result in results]
        assert losses[1 - BAD_RANK] == losses[1 - BAD_RANK] and losses[BAD_RANK] != losses[BAD_RANK]
    assert all(torch.isfinite(torch.tensor(r["clip_nan_grad_only"][True]["losses"])).all() for r in results)
