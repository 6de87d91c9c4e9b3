"""The classes a config may build, by kind: what Hydra registers a schema for (`vlmtrain.configs`, which
adds the optimizer and schedule builders) and the allow-list of a saved config (`vlmtrain.checkpoint.saved_config`): a checkpoint's or export's
config rebuilds only these, never another `_target_`."""

from __future__ import annotations

from vlmtrain.losses import ClipLoss, LlipLoss, SigLipLoss
from vlmtrain.models.image_encoders import OpenClipVisionEncoder, TimmEncoder
from vlmtrain.models.llip_model import LlipModel
from vlmtrain.models.text_encoders import HFTextEncoder, OpenClipTextEncoder
from vlmtrain.models.two_tower import TwoTower

COMPONENTS = {
    "model": {"two_tower": TwoTower, "llip": LlipModel},
    "image_encoder": {"openclip": OpenClipVisionEncoder, "timm": TimmEncoder},
    "text_encoder": {"openclip": OpenClipTextEncoder, "hf": HFTextEncoder},
    "loss": {"clip": ClipLoss, "siglip": SigLipLoss, "llip": LlipLoss},
}


def target_name(target: type | object) -> str:
    """The `_target_` a config names `target` by: module and qualified name."""
    return f"{target.__module__}.{target.__qualname__}"
