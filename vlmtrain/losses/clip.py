"""InfoNCE (CLIP): symmetric cross-entropy over image-text similarities with a learnable temperature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClipLoss(nn.Module):
    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        **_: torch.Tensor,
    ) -> torch.Tensor:
        """Features are L2-normalised (B, D); `logit_scale` is the log temperature (exp'd here)."""
        logits = logit_scale.exp() * image_features @ text_features.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
