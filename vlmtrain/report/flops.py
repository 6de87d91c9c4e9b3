"""FLOPs of a training step per image-caption pair, GPUs' peak FLOP/s, and model FLOPs utilisation (MFU).

FLOPs are torch's FlopCounterMode count (2 per multiply-add of matmuls, convolutions and attention) of
the model's forward and backward on one image at the image tower's size and one caption at the text
tower's full context length, run on the meta device: nothing is allocated or computed. The loss, whose
cost per pair grows with the batch, is left out: for CLIP and SigLIP a dot product with each caption of
the batch (under 1% at the presets' sizes); Llip's mixing costs more per caption (K*H*d*2 + E*E
multiply-adds), a sizeable share at the papers' global batches, which this count then leaves out.
With the text padding left out (`model.text_encoder.trim_padding`), a step does less text-tower work
than this full-context count. Build the model without activation checkpointing: its recomputation
would count as backward FLOPs, and MFU counts the model's FLOPs, not the hardware's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) peak FLOP/s from NVIDIA's data sheets: H100 Tensor Core GPU (SXM5, PCIe, NVL), H200
# Tensor Core GPU (SXM, NVL), A100 Tensor Core GPU (SXM4 and PCIe alike), L40S. The sheets quote the tensor
# cores' bf16/fp16 with sparsity, twice the dense rate given here. fp32 is the CUDA cores' rate: torch's
# fp32 matmuls do not use TF32 unless torch.backends.cuda.matmul.allow_tf32 is set.
PEAKS: tuple[tuple[str, float, float], ...] = (  # (name substring, bf16/fp16, fp32); first match wins
    ("H100 PCIe", 756e12, 51e12),
    ("H100 NVL", 835.5e12, 60e12),
    ("H100", 989.4e12, 67e12),  # SXM5, which torch names "NVIDIA H100 80GB HBM3"
    ("H200 NVL", 835.5e12, 60e12),
    ("H200", 989.4e12, 67e12),  # also GH200, the same GPU's rates
    ("A100", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per image-caption pair."""

    forward: float
    backward: float  # 0 where only the forward was counted

    @property
    def train(self) -> float:
        return self.forward + self.backward


def count_flops(build: Callable[[], nn.Module], backward: bool = True) -> StepFlops:
    """The forward (and backward) FLOPs for one pair of the two-tower model `build()` returns, called on
    the meta device; the model's forward takes (images, tokens) and returns a tensor or a dict of them."""
    with torch.device("meta"):
        model = build()
        size, length = model.image_encoder.image_size, model.text_encoder.context_length
        images = torch.empty(1, 3, size, size)
        tokens = torch.zeros(1, length, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        out = model(images, tokens)
    forward = counter.get_total_flops()
    if not backward:
        return StepFlops(forward, 0.0)
    outputs = out.values() if isinstance(out, dict) else [out]
    # the sum's gradient is a fill, which counts nothing: what is counted is the model's backward
    scalar = sum(t.sum() for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad)
    with FlopCounterMode(display=False) as counter:
        scalar.backward()
    return StepFlops(forward, counter.get_total_flops())


def train_flops_per_sample(build: Callable[[], nn.Module]) -> float:
    """Forward plus backward FLOPs of one training step per image-caption pair (see count_flops)."""
    return count_flops(build).train


def peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """A GPU's dense peak FLOP/s for `dtype` (bf16, fp16 or fp32), by a substring of its name as
    torch.cuda.get_device_name() gives it; None for a GPU or dtype the table does not know."""
    for key, half, single in PEAKS:
        if key.lower() in device_name.lower():
            return {torch.bfloat16: half, torch.float16: half, torch.float32: single}.get(dtype)
    return None


def mfu(samples_per_s: float, flops_per_sample: float, peak: float) -> float:
    """Model FLOPs utilisation: the model's FLOP/s over the hardware's peak."""
    return samples_per_s * flops_per_sample / peak
