"""open_clip_train's side of benchmarks/throughput.py: open_clip's model config and open_clip_train's
options for what vlmtrain's resolved Hydra config describes, and the entry point that starts
open_clip_train.

This file also runs under open_clip_train's own venv (`python openclip_side.py ARGS...` starts it), so
its top level imports only the standard library. open_clip_train runs unchanged except that each
sample's caption is one line picked at random from its .txt, as vlmtrain does (open_clip_train would
otherwise tokenize all the lines joined, a different task and more work).
"""

from __future__ import annotations

import random
import sys
from typing import Any


def _tower_cfg(encoder: Any, key: str) -> dict[str, Any]:
    """A tower's open_clip config: the named preset's fields, then the explicit ones (as vlmtrain builds it)."""
    import open_clip
    from omegaconf import OmegaConf

    cfg = dict(open_clip.get_model_config(encoder.model_name)[key]) if encoder.model_name else {}
    cfg.update(OmegaConf.to_container(encoder[key], resolve=True) or {})
    if encoder.get("context_length") is not None:  # a text tower's own field wins over text_cfg's
        cfg["context_length"] = int(encoder.context_length)
    return cfg


def openclip_model_cfg(cfg: Any) -> dict[str, Any]:
    """open_clip's `model_cfg` for the two towers vlmtrain's config builds; only open_clip towers map."""
    model = cfg.model
    expected = {
        "image_encoder": "vlmtrain.models.image_encoders.OpenClipVisionEncoder",
        "text_encoder": "vlmtrain.models.text_encoders.OpenClipTextEncoder",
    }
    for part, target in expected.items():
        if model[part]._target_ != target:
            raise SystemExit(f"error: model.{part} must be {target} to compare with open_clip")
    if model.get("init_logit_bias") is not None:
        raise SystemExit("error: model.init_logit_bias is set; open_clip's CLIP loss has no bias")
    return {
        "embed_dim": int(model.embed_dim),
        "init_logit_scale": float(model.init_logit_scale),
        "vision_cfg": _tower_cfg(model.image_encoder, "vision_cfg"),
        "text_cfg": _tower_cfg(model.text_encoder, "text_cfg"),
    }


def openclip_train_args(cfg: Any) -> list[str]:
    """open_clip_train options for vlmtrain's optimizer, schedule, clipping, loss, augmentation, compile
    and activation checkpointing."""
    optim, schedule = cfg.optim, cfg.schedule
    if not optim._target_.endswith(".adamw"):
        raise SystemExit(f"error: optim {optim._target_} has no open_clip_train equivalent (AdamW only)")
    if not cfg.loss._target_.endswith(".ClipLoss"):
        raise SystemExit(f"error: loss {cfg.loss._target_} is not open_clip_train's default CLIP loss")
    schedulers = {"warmup_cosine": "cosine", "constant": "const"}
    scheduler = schedulers.get(schedule._target_.rsplit(".", 1)[-1])
    if scheduler is None or schedule.get("min_lr_ratio", 0.0):
        raise SystemExit(f"error: schedule {schedule._target_} has no open_clip_train equivalent")
    crop = cfg.data.random_crop_scale
    if not crop:
        raise SystemExit("error: data.random_crop_scale must be set: open_clip_train always random-crops")
    args = ["--lr", str(optim.lr), "--wd", str(optim.weight_decay), "--eps", str(optim.eps)]
    args += ["--beta1", str(optim.betas[0]), "--beta2", str(optim.betas[1])]
    args += ["--lr-scheduler", scheduler, "--warmup", str(schedule.warmup_steps)]
    precision = {"fp32": "fp32", "bf16": "amp_bf16"}[cfg.trainer.precision]  # open_clip's bf16: bf16 weights
    args += ["--aug-cfg", f"scale=({float(crop[0])},{float(crop[1])})", "--precision", precision]
    if cfg.trainer.grad_clip:
        args += ["--grad-clip-norm", str(cfg.trainer.grad_clip)]
    if cfg.trainer.compile:
        args.append("--torchcompile")
    checkpointing = {
        cfg.model.image_encoder.get("grad_checkpointing"),
        cfg.model.text_encoder.get("grad_checkpointing"),
    }
    if len(checkpointing) > 1:
        raise SystemExit("error: open_clip_train checkpoints both towers or neither (--grad-checkpointing)")
    if checkpointing == {True}:
        args.append("--grad-checkpointing")
    return args


class OneCaption:
    """open_clip's tokenizer applied to one caption picked at random from a multi-line .txt."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: str | list[str], *args: Any, **kwargs: Any) -> Any:
        pick = [texts] if isinstance(texts, str) else texts
        pick = [random.choice(t.splitlines() or [t]) for t in pick]
        return self.tokenizer(pick, *args, **kwargs)


def openclip_train(argv: list[str]) -> None:
    """open_clip_train's own main(), with the one-caption tokenizer."""
    import open_clip_train.main as openclip_main

    get_tokenizer = openclip_main.get_tokenizer
    openclip_main.get_tokenizer = lambda *a, **k: OneCaption(get_tokenizer(*a, **k))
    openclip_main.main(argv)


if __name__ == "__main__":
    openclip_train(sys.argv[1:])
