"""Sharded (FSDP2) training equals DDP on real gloo process groups: the same per-step losses, gradient
norms (clipping over sharded gradients) and final weights, for CLIP, SigLIP and Llip, whole batches and 2
micro-batches, on small open_clip towers whose transformer blocks are sharded one by one."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from tests.helpers.ranks import fork_ranks
from tests.helpers.tiny import TEXT, VISION, tiny_model_config
from vlmtrain.distributed.sharding import (
    full_state_dict,
    full_value,
    gathered,
    load_full_state_dict,
    shard_model,
    shardable_blocks,
)
from vlmtrain.losses import ClipLoss, LlipLoss, SigLipLoss
from vlmtrain.train.accumulate import accumulated_backward

B, STEPS, CLIP_AT = 4, 5, 0.05  # local batch; a clip norm the gradients exceed, so clipping acts
# float64: the two paths sum gradients in different orders; in float32 that alone moves the gradient norm
# by about 1e-5 relative within 5 steps, in float64 it leaves only what the sharding itself would change
DTYPE = torch.float64
LOSSES = {
    "clip": (False, lambda: ClipLoss()),
    "siglip": (False, lambda: SigLipLoss(chunk_size=2)),
    "llip": (True, lambda: LlipLoss(chunk_size=2)),
}


def build_model(loss: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return instantiate(OmegaConf.create(tiny_model_config(llip=LOSSES[loss][0]))).to(DTYPE)


def batch(rank: int, world: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of one global batch (the same each step, so the loss must fall)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(world * B, 3, VISION["image_size"], VISION["image_size"], generator=g, dtype=DTYPE)
    tokens = torch.randint(1, TEXT["vocab_size"], (world * B, TEXT["context_length"]), generator=g)
    rows = slice(rank * B, (rank + 1) * B)
    return images[rows], tokens[rows]


def train(loss: str, parallel: str, rank: int, micro_batches: int = 1, world: int = 2) -> dict:
    model = build_model(loss)
    wrapped = (
        shard_model(model, mixed_precision=False) if parallel == "fsdp" else DistributedDataParallel(model)
    )
    loss_fn = LOSSES[loss][1]()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    losses, norms = [], []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        if micro_batches > 1:  # the whole batch's loss, activations one micro-batch at a time
            value = accumulated_backward(wrapped, loss_fn, *batch(rank, world), micro_batches, nullcontext)
        else:
            value = loss_fn(**wrapped(*batch(rank, world)))
            value.backward()
        norms.append(full_value(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_AT)).item())
        optimizer.step()
        losses.append(value.item())
    # flattened: the sharded model's temperature and bias are 1-element vectors, DDP's are scalars
    weights = {k: full_value(v).detach().reshape(-1) for k, v in model.state_dict().items()}
    return {"losses": losses, "norms": norms, "weights": weights}


# (loss, micro-batches) at each world size: 4 ranks share the 2 cores, so they run only the 2-micro-batch cases
CASES = {
    2: [("clip", 1), ("clip", 2), ("siglip", 2), ("llip", 2)],
    4: [("clip", 2), ("siglip", 2), ("llip", 2)],
}


def _work(rank: int, world: int) -> dict:
    return {
        (*case, parallel): train(case[0], parallel, rank, case[1], world)
        for case in CASES[world]
        for parallel in ("ddp", "fsdp")
    }


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_trains_like_ddp(tmp_path: Path, world: int) -> None:
    results = fork_ranks(_work, world, tmp_path, timeout_s=240)
    for rank, result in enumerate(results):
        for loss, micro_batches in CASES[world]:
            ddp, fsdp = result[(loss, micro_batches, "ddp")], result[(loss, micro_batches, "fsdp")]
            torch.testing.assert_close(
                fsdp["losses"], ddp["losses"], rtol=1e-5, atol=0, msg=f"{loss} r{rank}"
            )
            torch.testing.assert_close(fsdp["norms"], ddp["norms"], rtol=1e-5, atol=0, msg=f"{loss} r{rank}")
            assert min(ddp["norms"]) > CLIP_AT  # clipping acted on every step
            # and the model learned (Llip's loss swings at 4 ranks with this rate, below its start and back)
            assert min(ddp["losses"][1:]) < ddp["losses"][0], (loss, ddp["losses"])
            assert fsdp["weights"].keys() == ddp["weights"].keys()
            for key, value in ddp["weights"].items():
                torch.testing.assert_close(fsdp["weights"][key], value, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.slow
def test_blocks_of_both_towers_are_found() -> None:
    """Each open_clip tower's resblocks (2 per tower here); the Llip head, without blocks, stays whole."""
    for loss in ("clip", "llip"):
        model = build_model(loss)
        blocks = shardable_blocks(model)
        expected = [
            *model.image_encoder.tower.transformer.resblocks,
            *model.text_encoder.tower.transformer.resblocks,
        ]
        assert [id(b) for b in blocks] == [id(b) for b in expected]


def _bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def _held_bytes(rank: int, world: int) -> dict:
    """This rank's parameter and AdamW-moment bytes after one sharded step; the full model's bytes."""
    model = build_model("clip")
    full = sum(_bytes(p) for p in model.parameters())
    shard_model(model, mixed_precision=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ClipLoss()(**model(*batch(rank, world))).backward()
    optimizer.step()
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
    params = sum(_bytes(p) for p in model.parameters())
    return {"full": full, "params": params, "optimizer": sum(_bytes(m) for m in moments)}


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_rank_holds_its_share(tmp_path: Path, world: int) -> None:
    """Each rank's parameters and optimizer state are about 1/N of the model's (FSDP pads a tensor's first
    dimension to a multiple of N: rank 0 holds the larger pieces), and the ranks' pieces add up to it."""
    results = fork_ranks(_held_bytes, world, tmp_path)
    full = results[0]["full"]
    for held in results:
        assert held["params"] == pytest.approx(full / world, rel=0.01)
        assert held["optimizer"] == pytest.approx(2 * full / world, rel=0.01)
    assert sum(held["params"] for held in results) == full
    assert sum(held["optimizer"] for held in results) == 2 * full


class _Row(torch.nn.Module):
    """A parameter with one row (fewer than the ranks): sharded along its columns instead."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.row = torch.nn.Parameter(torch.randn(1, 6, dtype=DTYPE))
        self.linear = torch.nn.Linear(6, 6, dtype=DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.row).square().mean()


def _train_row(rank: int, world: int) -> dict:
    model = _Row()
    if world > 1:
        shard_model(model, mixed_precision=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(2 * B, 6, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    rows = slice(None) if world == 1 else slice(rank * B, (rank + 1) * B)
    for _ in range(3):
        optimizer.zero_grad()
        model(x[rows]).backward()
        optimizer.step()
    local = model.row.to_local().shape if isinstance(model.row, DTensor) else model.row.shape
    return {"local": tuple(local), "row": full_value(model.row).detach()}


@pytest.mark.slow
def test_a_short_first_dimension_shards_along_another(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    sharded = fork_ranks(_train_row, 2, tmp_path)
    whole = fork_ranks(_train_row, 1, tmp_path / "one")[0]
    assert [r["local"] for r in sharded] == [(1, 3), (1, 3)]
    for result in sharded:
        torch.testing.assert_close(result["row"], whole["row"], rtol=1e-10, atol=1e-12)


def _full_state(rank: int, world: int) -> dict:
    reference = build_model("llip").state_dict()
    model = shard_model(build_model("llip"), mixed_precision=False)
    changed = {k: v + 1 for k, v in reference.items()}
    load_full_state_dict(model, changed)
    return {"reference": changed, "full": full_state_dict(model)}


@pytest.mark.slow
def test_full_state_dict_is_the_unsharded_models(tmp_path: Path) -> None:
    """Out of a sharded model comes the state dict an unsharded one has (scalars as scalars), and in
    goes one: what checkpoints of DDP runs and exports hold."""
    first, second = fork_ranks(_full_state, 2, tmp_path)
    assert second["full"] == {}  # gathered onto rank 0 only
    assert first["full"].keys() == first["reference"].keys()
    for key, value in first["reference"].items():
        assert first["full"][key].shape == value.shape, key
        torch.testing.assert_close(first["full"][key], value, rtol=0, atol=0, msg=key)


def _mixed(rank: int, world: int) -> dict:
    model = shard_model(build_model("clip").float(), mixed_precision=True)
    seen = []
    block = model.image_encoder.tower.transformer.resblocks[0]
    block.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    images, tokens = batch(rank)
    ClipLoss()(**model(images.float(), tokens)).backward()
    params = {name: (p.dtype, p.grad.dtype) for name, p in model.named_parameters()}
    return {"block": seen, "params": params}


@pytest.mark.slow
def test_mixed_precision_computes_in_bf16_and_keeps_fp32_state(tmp_path: Path) -> None:
    for result in fork_ranks(_mixed, 2, tmp_path):
        assert result["block"] == [(torch.bfloat16, torch.bfloat16)]
        assert set(result["params"].values()) == {(torch.float32, torch.float32)}


def _encode(rank: int, world: int) -> dict:
    """Each rank scores its rows against every caption, as a sharded evaluation would."""
    images, _ = batch(rank)
    _, tokens = batch(0)
    out = {}
    for name, model in (
        ("whole", build_model("llip")),
        ("sharded", shard_model(build_model("llip"), mixed_precision=False)),
    ):
        with torch.no_grad(), gathered(model):
            image, text = model.eval().encode_image(images), model.encode_text(tokens)
            out[name] = (image, text, model.similarity(image, text))
    return out


@pytest.mark.slow
def test_evaluation_methods_gather_the_weights(tmp_path: Path) -> None:
    """encode_image, encode_text and the Llip similarity (the head's weights, outside forward) give the
    unsharded model's values on every rank."""
    for result in fork_ranks(_encode, 2, tmp_path):
        for whole, sharded in zip(result["whole"], result["sharded"]):
            torch.testing.assert_close(sharded, whole, rtol=1e-12, atol=1e-12)
