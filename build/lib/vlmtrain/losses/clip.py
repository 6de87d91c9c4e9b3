"""InfoNCE (CLIP): symmetric cross-entropy over image-text similarities with a learnable temperature.

Distributed convention, shared by every loss in this package. Each rank passes its local batch (the same
size B on every rank) and returns its share L_r of the loss on the global batch of W * B pairs, chosen so
that the sum over ranks is W times the single-process loss L on the concatenated batch:

    sum_r L_r = W * L        (as a function of every rank's inputs)

Gradients of gathered or exchanged tensors flow back to their owners and are summed there, so rank s
ends up with d(sum_r L_r)/d(its features) = W * dL/d(its features), and replicated parameters (the
temperature, a bias, a Llip head) get dL_r/dp. DDP averages over ranks, which divides both by W: every
parameter receives exactly the single-process gradient dL/dp. The logged loss is the mean over ranks of L_r.

Here, with local_loss (local rows against global columns), L_r is the mean cross-entropy of the local rows,
so L_r sums to W * L. Without it every rank computes the whole W*B x W*B matrix, so L_r = L and
the gathered copies send W gradients home. Without gather_with_grad only the local slice carries a
gradient; scaling it by W restores the convention (this needs the full matrix: with local_loss the
gradient of the local features as other ranks' columns would be lost).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmtrain.losses.collectives import all_gather_no_grad, all_gather_with_grad, world_info


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor, factor: float
    ) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def _gather_local_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows without cross-rank gradients; the local slice counts W times (see module doc)."""
    rank, world = world_info()
    parts = all_gather_no_grad(tensor)
    parts[rank] = _ScaleGrad.apply(tensor, float(world))
    return torch.cat(parts, dim=0)


class ClipLoss(nn.Module):
    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True) -> None:
        super().__init__()
        if local_loss and not gather_with_grad:
            raise ValueError(
                "loss.local_loss=true needs loss.gather_with_grad=true: without it the gradient of each "
                "rank's features as the other ranks' columns is lost (use local_loss=false instead)"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        **_: torch.Tensor,
    ) -> torch.Tensor:
        """Features are L2-normalised (B, D); `logit_scale` is the log temperature (exp'd here).

        A bias does not change a softmax; it is added anyway so that a model that has one still gives it a
        (zero) gradient, which DDP expects of every parameter.
        """
        scale = logit_scale.exp()
        if self.local_loss:
            return self._local(image_features, text_features, scale, logit_bias)
        return self._full(image_features, text_features, scale, logit_bias)

    def _local(
        self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        rank, _ = world_info()
        all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)
        per_image = _logits(image, all_text, scale, bias)
        per_text = _logits(text, all_image, scale, bias)
        labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2

    def _full(
        self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        gather = all_gather_with_grad if self.gather_with_grad else _gather_local_grad
        per_image = _logits(gather(image), gather(text), scale, bias)
        labels = torch.arange(per_image.shape[0], device=per_image.device)
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_image.T, labels)) / 2


def _logits(
    rows: torch.Tensor, columns: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    logits = scale * rows @ columns.T
    return logits if bias is None else logits + bias
