"""Loading local weight files into towers (never from a hub).

A file holds either one tower's own state dict (a timm checkpoint, a tower saved on its own) or a whole
open_clip checkpoint (`state_dict` of a CLIP model, `module.` prefixes from DDP included), from which
`open_clip_part` takes the image (`visual.`) or text part.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]
NOT_TEXT = ("visual.", "logit_scale", "logit_bias", "attn_mask")


def read_state_dict(path: Path) -> StateDict:
    if not path.exists():
        raise FileNotFoundError(f"pretrained_path: no such file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if state and all(key.startswith("module.") for key in state):  # saved from inside DDP
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def open_clip_part(part: str) -> Callable[[StateDict], StateDict]:
    """A whole open_clip CLIP checkpoint -> its `visual` or `text` tower's state (keys as the tower's own);
    a state that is not a whole CLIP checkpoint is returned as it is."""

    def select(state: StateDict) -> StateDict:
        if not any(key.startswith("visual.") for key in state):
            return state
        if part == "visual":
            return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        if any(key.startswith("text.") for key in state):  # CustomTextCLIP keeps the text tower in `text.`
            return {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
        return {k: v for k, v in state.items() if not k.startswith(NOT_TEXT)}

    return select


def load_weights(
    module: nn.Module, path: Path, select: Callable[[StateDict], StateDict] | None = None
) -> None:
    """Load a state dict file strictly, ignoring classifier heads the tower does not have."""
    state = read_state_dict(path)
    if select is not None:
        state = select(state)
    own = module.state_dict()
    dropped = [k for k in state if k not in own and k.split(".")[0] in ("head", "fc", "classifier")]
    for key in dropped:
        state.pop(key)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise ValueError(f"pretrained_path: {path} does not fit the tower ({detail})") from None
