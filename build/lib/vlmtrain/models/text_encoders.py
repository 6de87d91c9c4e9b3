"""Text towers. Each maps (B, L) token ids to (B, embed_dim) features and provides its tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIPTextCfg, _build_text_tower
from torch import nn

from vlmtrain.extras import require
from vlmtrain.models.weights import load_weights

Tokenizer = Callable[[list[str]], torch.Tensor]


class OpenClipTextEncoder(nn.Module):
    """open_clip's text transformer (causal, EOT pooling), from a preset name and/or `text_cfg` fields.
    `context_length`, when set, replaces text_cfg's (every text tower has one, so experiments set it)."""

    def __init__(
        self,
        embed_dim: int,
        model_name: str | None = None,
        text_cfg: dict[str, Any] | None = None,
        pretrained_path: str | None = None,
        context_length: int | None = None,
    ) -> None:
        super().__init__()
        cfg = dict(open_clip.get_model_config(model_name)["text_cfg"]) if model_name else {}
        cfg.update(text_cfg or {})
        if context_length is not None:
            cfg["context_length"] = context_length
        self.text_cfg = cfg
        self.tower = _build_text_tower(embed_dim, CLIPTextCfg(**cfg))
        self.context_length = self.tower.context_length
        if pretrained_path:
            load_weights(self.tower, Path(pretrained_path))

    def tokenizer(self) -> Tokenizer:
        return open_clip.SimpleTokenizer(context_length=self.context_length)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tower(tokens)


class HFTokenizer:
    """A picklable wrapper padding/truncating to a fixed length, as the batching code expects."""

    def __init__(self, path: str, context_length: int) -> None:
        transformers = require("transformers", "hf", "model.text_encoder=hf")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return out["input_ids"]


class HFTextEncoder(nn.Module):
    """A Hugging Face text model loaded from a local directory; mean or CLS pooling, linear projection."""

    def __init__(
        self,
        embed_dim: int,
        path: str,
        context_length: int = 77,
        pooling: str = "mean",
        proj_bias: bool = False,
    ) -> None:
        super().__init__()
        transformers = require("transformers", "hf", "model.text_encoder=hf")
        AutoConfig, AutoModel = transformers.AutoConfig, transformers.AutoModel

        if not Path(path).is_dir():
            raise FileNotFoundError(f"model.text_encoder.path: no such directory {path}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"model.text_encoder.pooling: expected 'mean' or 'cls', got {pooling!r}")
        self.path, self.context_length, self.pooling = path, context_length, pooling
        self.transformer = AutoModel.from_pretrained(path, local_files_only=True)
        self.pad_id = AutoConfig.from_pretrained(path, local_files_only=True).pad_token_id or 0
        self.proj = nn.Linear(self.transformer.config.hidden_size, embed_dim, bias=proj_bias)

    def tokenizer(self) -> Tokenizer:
        return HFTokenizer(self.path, self.context_length)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != self.pad_id).long()
        hidden = self.transformer(input_ids=tokens, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.proj(pooled)
