"""The classes a config may build, by kind: what Hydra registers a schema for (`vlmtrain.configs`) and
the allow-list of a saved config (`vlmtrain.checkpoint.saved_config`): a checkpoint's or export's
config rebuilds only these, never another `_target_`."""

from __future__ import annotations

from vlmtrain.losses import ClipLoss, LlipLoss, SigLipLoss
from vlmtrain.models.image_encoders import OpenClipVisionEncoder, TimmEncoder
from vlmtrain.models.llip_model import LlipModel
from vlmtrain.models.text_encoders import HFTextEncoder, OpenClipTextEncoder
from vlmtrain.models.two_tower import TwoTower
from vlmtrain.train import optim

COMPONENTS = {
    "model": {"two_tower": TwoTower, "llip": LlipModel},
    "image_encoder": {"openclip": OpenClipVisionEncoder, "timm": TimmEncoder},
    "text_encoder": {"openclip": OpenClipTextEncoder, "hf": HFTextEncoder},
    "loss": {"clip": ClipLoss, "siglip": SigLipLoss, "llip": LlipLoss},
}
# Called by the trainer with the model (optimizer) or the optimizer (schedule) first.
PARTIAL_COMPONENTS = {
    "optim": {"adamw": optim.adamw},
    "schedule": {"warmup_cosine": optim.warmup_cosine, "constant": optim.constant},
}


def target_name(target: type | object) -> str:
    """The `_target_` a config names `target` by: module and qualified name."""
    return f"{target.__module__}.{target.__qualname__}"
