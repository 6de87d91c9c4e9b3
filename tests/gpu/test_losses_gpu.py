"""The sigmoid losses on a GPU: exact in fp32, close under bf16 autocast, and Llip's memory flat in the
global batch (measured with the CUDA allocator, which the CPU tests cannot do)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmtrain.losses import LlipLoss, SigLipLoss
from vlmtrain.models.llip_head import mix

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

D, K, H, TAU = 512, 64, 8, 5.0


def _leaf(*shape, normalize=False, scale=1.0):
    x = torch.randn(*shape, device="cuda")
    return (F.normalize(x, dim=-1) if normalize else x * scale).requires_grad_()


def _llip_inputs(b_local: int, n_global: int) -> dict:
    """One rank's images and captions plus the other ranks' packed (text feature, query) blocks."""
    torch.manual_seed(0)
    return dict(
        keys=_leaf(b_local, H, K, D // H),
        values=_leaf(b_local, H, K, D // H),
        queries=_leaf(b_local, H, D // H),
        text=_leaf(b_local, D, normalize=True),
        out_proj=_leaf(D, D, scale=D**-0.5),
        scale=torch.tensor(2.3, device="cuda", requires_grad=True),
        bias=torch.tensor(-10.0, device="cuda", requires_grad=True),
        remote=[_leaf(b_local, 2 * D) for _ in range(n_global // b_local - 1)],
    )


def _chunked_llip(x: dict, chunk_size: int) -> torch.Tensor:
    loss = LlipLoss(chunk_size=chunk_size)
    loss.remote_blocks = lambda packed: x["remote"]
    return loss(
        x["keys"], x["values"], x["queries"], x["text"], x["scale"], x["bias"],
        llip_out_proj=x["out_proj"], llip_temperature=TAU,
    )  # fmt: skip


def _dense_llip(x: dict) -> torch.Tensor:
    remote = torch.cat(x["remote"]) if x["remote"] else x["text"].new_zeros(0, 2 * D)
    texts = torch.cat([x["text"], remote[:, :D]])
    queries = torch.cat([x["queries"], remote[:, D:].view(-1, H, D // H)])
    mixed = mix(x["keys"], x["values"], queries, x["out_proj"], TAU)  # (B_local, B_global, D)
    logits = x["scale"].exp() * torch.einsum("itd,td->it", mixed, texts) + x["bias"]
    signs = -torch.ones_like(logits)
    signs.diagonal().fill_(1.0)
    return -F.logsigmoid(signs * logits).sum() / x["keys"].shape[0]


def _leaves(x: dict) -> list[torch.Tensor]:
    return [v for k, v in x.items() if k != "remote"] + x["remote"]


def _working_bytes(fn, x: dict) -> int:
    """Peak CUDA memory of fn().backward() beyond the inputs' gradients (each input takes one)."""
    for t in _leaves(x):
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn().backward()
    torch.cuda.synchronize()
    grads = sum(t.numel() * t.element_size() for t in _leaves(x))
    return torch.cuda.max_memory_allocated() - before - grads


def test_chunked_llip_equals_dense_on_gpu():
    x = _llip_inputs(64, 512)
    ours, dense = _chunked_llip(x, chunk_size=48), _dense_llip(x)
    torch.testing.assert_close(ours, dense, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours, _leaves(x)), torch.autograd.grad(dense, _leaves(x))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_llip_working_memory_is_flat_in_the_global_batch():
    small = _llip_inputs(64, 1024)
    at_1k = _working_bytes(lambda: _chunked_llip(small, 64), small)
    large = _llip_inputs(64, 4096)
    at_4k = _working_bytes(lambda: _chunked_llip(large, 64), large)
    dense_4k = _working_bytes(lambda: _dense_llip(large), large)
    assert at_4k <= 1.05 * at_1k + 2**20, (at_1k, at_4k)
    assert 8 * at_4k < dense_4k, (at_4k, dense_4k)


@pytest.mark.parametrize("loss", ["siglip", "llip"])
def test_bf16_autocast_stays_close_to_fp32(loss):
    x = _llip_inputs(128, 512)
    if loss == "llip":
        run = lambda: _chunked_llip(x, 64)  # noqa: E731
    else:
        siglip = SigLipLoss(chunk_size=64)
        remote = [r[:, :D] for r in x["remote"]]
        siglip.remote_blocks = lambda packed: remote
        image = F.normalize(x["values"].flatten(1)[:, :D], dim=-1)
        run = lambda: siglip(image, x["text"], x["scale"], x["bias"])  # noqa: E731
    exact = run()
    exact_grads = torch.autograd.grad(exact, [x["text"], x["scale"], x["bias"]])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = run()
    assert low.dtype == torch.float32  # the pair loss itself is summed in fp32
    low_grads = torch.autograd.grad(low, [x["text"], x["scale"], x["bias"]])
    torch.testing.assert_close(low, exact, rtol=2e-2, atol=0)
    for a, b in zip(low_grads, exact_grads):
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
