"""How a vlmtrain two-tower model maps onto open_clip's `CLIP`: its config, its weight names, and a check.

open_clip can express a `TwoTower` whose image tower is an open_clip vision tower (or a timm model with
no extra constructor arguments, through `timm_model_name`) and whose text tower is open_clip's text
transformer. The text tower's weights sit at the top level of `CLIP` (token_embedding, transformer.*,
...); a text tower with a class token needs `CustomTextCLIP`, which nests them under `text.`, because
`CLIP.encode_text` ignores the class token. Rather than trust this mapping, `check` builds the open_clip
model, loads the renamed weights strictly and compares embeddings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmtrain.checkpoint.load import KeyPrefixes, file_key
from vlmtrain.models import libraries
from vlmtrain.models.image_encoders import OpenClipVisionEncoder, TimmEncoder
from vlmtrain.models.text_encoders import OpenClipTextEncoder
from vlmtrain.models.two_tower import TwoTower

# Tokenizer choices live in open_clip's text_cfg but vlmtrain's tower always uses SimpleTokenizer with its
# context length; dropping them makes open_clip.get_tokenizer pick that same tokenizer.
TOKENIZER_KEYS = ("hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs")
CHECK_TOLERANCE = 1e-4


class NotExpressible(ValueError):
    """open_clip's format has no way to describe this model; the message names the part."""


@dataclass(frozen=True)
class OpenClipLayout:
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    key_prefixes: KeyPrefixes  # vlmtrain state-dict prefix -> open_clip prefix

    def config_json(self) -> dict[str, Any]:
        return {"model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg}


def describe(module: nn.Module, config: dict[str, Any]) -> str:
    name = config.get("model_name")
    return f"{type(module).__name__}({name})" if name else type(module).__name__


def _vision(encoder: nn.Module, config: dict[str, Any]) -> tuple[dict[str, Any], KeyPrefixes]:
    if isinstance(encoder, OpenClipVisionEncoder):
        return dict(encoder.vision_cfg), [("image_encoder.tower.", "visual.")]
    if isinstance(encoder, TimmEncoder):
        if config.get("model_kwargs"):
            raise NotExpressible(
                f"image tower {describe(encoder, config)} with model_kwargs {dict(config['model_kwargs'])}"
            )
        vision_cfg = {
            "timm_model_name": config["model_name"],
            "timm_pool": "",  # keep the timm model's own pooling, as TimmEncoder does
            "timm_proj": "linear",
            "timm_proj_bias": encoder.proj.bias is not None,
            "image_size": encoder.image_size,
        }
        return vision_cfg, [
            ("image_encoder.trunk.", "visual.trunk."),
            ("image_encoder.proj.", "visual.head.proj."),
        ]
    raise NotExpressible(f"image tower {describe(encoder, config)}")


def _text(encoder: nn.Module, config: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(text_cfg, whether it needs CustomTextCLIP)."""
    if not isinstance(encoder, OpenClipTextEncoder):
        raise NotExpressible(
            f"text tower {describe(encoder, config)} "
            "(open_clip builds Hugging Face text towers from hub names only)"
        )
    text_cfg = {k: v for k, v in encoder.text_cfg.items() if k not in TOKENIZER_KEYS}
    if text_cfg.get("hf_model_name"):
        raise NotExpressible(f"text tower {describe(encoder, config)} with hf_model_name")
    return text_cfg, bool(text_cfg.get("embed_cls"))


def layout(model: nn.Module, config: dict[str, Any]) -> OpenClipLayout:
    """open_clip's config and weight names for `model` (built from `config`), or NotExpressible."""
    if type(model) is not TwoTower:
        raise NotExpressible(f"model {type(model).__name__}")
    vision_cfg, vision_prefixes = _vision(model.image_encoder, config.get("image_encoder", {}))
    text_cfg, custom_text = _text(model.text_encoder, config.get("text_encoder", {}))
    model_cfg = {
        "embed_dim": model.embed_dim,
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
        "init_logit_scale": model.logit_scale.item(),
    }
    if model.logit_bias is not None:
        model_cfg["init_logit_bias"] = model.logit_bias.item()
    if custom_text:
        model_cfg["custom_text"] = True
    encoder = model.image_encoder
    preprocess_cfg = {  # what vlmtrain.data.transforms.image_transform does at eval time
        "size": encoder.image_size,
        "mean": list(encoder.mean),
        "std": list(encoder.std),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    prefixes = [*vision_prefixes, ("text_encoder.tower.", "text." if custom_text else "")]
    return OpenClipLayout(to_plain(model_cfg), preprocess_cfg, prefixes)


def to_plain(value: Any) -> Any:
    """JSON-ready copy: OmegaConf containers (Hydra passes them into towers) and tuples become dicts/lists."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


def build_open_clip(spec: OpenClipLayout) -> nn.Module:
    """The open_clip model `open_clip.create_model('local-dir:...')` builds from this config."""
    cfg = copy.deepcopy(spec.model_cfg)
    needs = ("timm",) if cfg["vision_cfg"].get("timm_model_name") else ()
    models = libraries.open_clip(*needs).model
    model_class = models.CustomTextCLIP if cfg.pop("custom_text", False) else models.CLIP
    return model_class(**cfg).eval()


def open_clip_state_dict(model: nn.Module, spec: OpenClipLayout) -> dict[str, torch.Tensor]:
    return {file_key(k, spec.key_prefixes): v for k, v in model.state_dict().items()}


def _first_shape_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> str | None:
    for key in sorted(set(ours) | set(theirs)):
        if key not in theirs:
            return f"open_clip has no {key}"
        if key not in ours:
            return f"open_clip expects {key}, which this model lacks"
        if ours[key].shape != theirs[key].shape:
            theirs_shape, ours_shape = tuple(theirs[key].shape), tuple(ours[key].shape)
            return f"open_clip builds {key} with shape {theirs_shape}, this model has {ours_shape}"
    return None


@torch.no_grad()
def check(model: nn.Module, spec: OpenClipLayout, config: dict[str, Any]) -> None:
    """Build the open_clip model, load the renamed weights strictly, compare embeddings on random inputs."""
    reference = build_open_clip(spec)
    ours = open_clip_state_dict(model, spec)
    difference = _first_shape_difference(ours, reference.state_dict())
    if difference:
        tower = "image" if "visual." in difference else "text"
        part = describe(getattr(model, f"{tower}_encoder"), config.get(f"{tower}_encoder", {}))
        raise NotExpressible(f"{tower} tower {part}: {difference}")
    reference.load_state_dict(ours, strict=True)
    size = model.image_encoder.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = model.text_encoder.tokenizer()(["a photo of a red circle", "two blue squares"])
    for name, inputs in (("image", images), ("text", tokens)):
        theirs = F.normalize(getattr(reference, f"encode_{name}")(inputs), dim=-1)
        error = (getattr(model, f"encode_{name}")(inputs) - theirs).abs().max().item()
        if error > CHECK_TOLERANCE:  # a bug in the mapping above, not a model open_clip cannot express
            raise RuntimeError(f"open_clip export check: {name} embeddings differ by {error:.2e}")
