"""Contrastive vision-language pretraining: CLIP, SigLIP and Llip on one trainer."""

from __future__ import annotations

from typing import Any

__all__ = ["load_pretrained"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import vlmtrain` (and every submodule import) stays cheap.
    if name == "load_pretrained":
        from vlmtrain.checkpoint.load import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'vlmtrain' has no attribute {name!r}")
