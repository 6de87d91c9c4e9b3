"""Contrastive losses, exact under data parallelism: CLIP (InfoNCE), SigLIP (sigmoid) and Llip."""

from vlmtrain.losses.clip import ClipLoss
from vlmtrain.losses.llip import LlipLoss
from vlmtrain.losses.siglip import SigLipLoss

__all__ = ["ClipLoss", "LlipLoss", "SigLipLoss"]
