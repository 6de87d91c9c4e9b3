"""Loading local weight files into towers (never from a hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"pretrained_path: no such file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def load_weights(module: nn.Module, path: Path) -> None:
    """Load a state dict file strictly, ignoring classifier heads the tower does not have."""
    state = read_state_dict(path)
    own = module.state_dict()
    dropped = [k for k in state if k not in own and k.split(".")[0] in ("head", "fc", "classifier")]
    for key in dropped:
        state.pop(key)
    module.load_state_dict(state, strict=True)
