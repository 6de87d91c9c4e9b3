"""Text towers. Each maps (B, L) token ids to (B, embed_dim) features and provides its tokenizer.

`needed_length(tokens)` is how many leading token columns a tower's output depends on: a causal tower
pooling at the end-of-text token never reads the padding after the batch's longest caption, nor does a
tower that masks its padding. The Trainer and evaluation hand a tower only those columns (rounded up
to a multiple of 8, so that a compiled tower sees few shapes): the same features, less work.

With `return_pooled` set (the Llip model sets it, to compute its queries from the pooled state as the
paper does) a tower returns the pair (pooled state before the projection (B, width), features).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmtrain.extras import require
from vlmtrain.models import libraries, locking
from vlmtrain.models.weights import load_weights, open_clip_part

Tokenizer = Callable[[list[str]], torch.Tensor]
TextOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class OpenClipTextEncoder(nn.Module):
    """open_clip's text transformer (causal, EOT pooling), from a preset name and/or `text_cfg` fields.
    `context_length`, when set, replaces text_cfg's (every text tower has one, so experiments set it).
    `tokenizer_path`: a local Hugging Face tokenizer folder for towers trained with their own vocabulary
    (SigLIP's); otherwise open_clip's CLIP BPE tokenizer. `tokenizer_clean`: how that HF tokenizer
    cleans captions first, as open_clip's HFTokenizer (canonicalize: lower case, no punctuation, single
    spaces; lower; whitespace); None: what the open_clip model config names (SigLIP's: canonicalize),
    else open_clip's default, whitespace. `pretrained_path`: this tower's weights or a whole open_clip
    checkpoint (its text part is taken). `trim_padding`: let the Trainer leave out the padding no
    output reads (causal towers pooling at the end-of-text or first token; SigLIP's towers attend to
    their padding and pool the last token, so they always get the whole context)."""

    def __init__(
        self,
        embed_dim: int,
        model_name: str | None = None,
        *,
        text_cfg: dict[str, Any] | None = None,
        pretrained_path: str | None = None,
        context_length: int | None = None,
        tokenizer_path: str | None = None,
        tokenizer_clean: str | None = None,
        quick_gelu: bool = False,
        grad_checkpointing: bool = False,
        locked: bool = False,
        unlocked_blocks: int = 0,
        trim_padding: bool = True,
    ) -> None:
        super().__init__()
        open_clip = libraries.open_clip()
        cfg = dict(open_clip.get_model_config(model_name)["text_cfg"]) if model_name else {}
        cfg.update(text_cfg or {})
        if cfg.get("hf_model_name"):  # a Hugging Face model inside open_clip
            open_clip = libraries.open_clip("transformers")
        cfg.pop("hf_tokenizer_name", None)  # tokenizer_path instead
        named_clean = (cfg.pop("tokenizer_kwargs", None) or {}).get("clean", "whitespace")
        self.tokenizer_clean = tokenizer_clean or named_clean
        check_clean("model.text_encoder.tokenizer_clean", self.tokenizer_clean)
        if context_length is not None:
            cfg["context_length"] = context_length
        self.text_cfg, self.tokenizer_path = cfg, tokenizer_path
        text = open_clip.model.CLIPTextCfg(**cfg)
        self.tower = open_clip.model._build_text_tower(embed_dim, text, quick_gelu=quick_gelu)
        self._pool = open_clip.transformer.text_global_pool
        self.context_length, self.width = self.tower.context_length, self.tower.width
        self.return_pooled = False
        tower = self.tower
        causal, pooled_at = tower.attn_mask is not None, tower.pool_type in ("argmax", "eos", "first")
        self.trim_padding = trim_padding and causal and pooled_at and tower.cls_emb is None
        if pretrained_path:
            load_weights(self.tower, Path(pretrained_path), open_clip_part("text"))
        locking.set_grad_checkpointing(self.tower, grad_checkpointing)
        blocks = self.tower.transformer.resblocks
        locking.check_lock("model.text_encoder", locked, unlocked_blocks, len(blocks))
        if locked:
            tail = [self.tower.ln_final, self.tower.text_projection] if unlocked_blocks else []
            locking.lock(self, locking.last_blocks(blocks, unlocked_blocks) + tail)

    def tokenizer(self) -> Tokenizer:
        if self.tokenizer_path:
            return HFTokenizer(self.tokenizer_path, self.context_length, self.tokenizer_clean)
        return open_clip_tokenizer(self.context_length)

    def needed_length(self, tokens: torch.Tensor) -> int:
        if not self.trim_padding:
            return tokens.shape[1]
        if self.tower.pool_type == "first":
            return padded_length(1, tokens.shape[1])
        eos = tokens == self.tower.eos_id if self.tower.pool_type == "eos" else None
        last = (eos.int() if eos is not None else tokens).argmax(dim=-1).max()  # text_global_pool's index
        return padded_length(int(last) + 1, tokens.shape[1])

    def forward(self, tokens: torch.Tensor) -> TextOutput:
        if not (self.return_pooled or self.trim_padding):
            return self.tower(tokens)
        tower = self.tower  # open_clip's TextTransformer.forward without a class token, any length
        if tower.cls_emb is not None:
            raise ValueError("model.text_encoder: a tower with a class token gives no pooled state")
        x, attn_mask = tower._embeds(tokens)
        if attn_mask is not None and attn_mask.shape[-1] != tokens.shape[1]:  # the whole causal mask
            attn_mask = attn_mask[: tokens.shape[1], : tokens.shape[1]]
        x = tower.ln_final(tower.transformer(x, attn_mask=attn_mask))
        pooled = self._pool(x, tokens, pool_type=tower.pool_type, eos_token_id=getattr(tower, "eos_id", None))
        projection = tower.text_projection
        if projection is not None:
            features = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
        else:
            features = pooled
        return (pooled, features) if self.return_pooled else features


@functools.cache
def open_clip_tokenizer(context_length: int) -> Tokenizer:
    """open_clip's CLIP BPE tokenizer, built once per process for each context length: reading its
    vocabulary takes about 0.1 s, and a Trainer, an evaluation and a load each ask for it. Callers only
    call it (its word cache is shared, which it is for)."""
    return libraries.open_clip().SimpleTokenizer(context_length=context_length)


def text_columns(encoder: nn.Module, tokens: torch.Tensor) -> int:
    """How many leading columns of `tokens` the text tower `encoder` reads: its `needed_length`, or all
    of them for a tower that does not say (one a user plugs in)."""
    needed_length = getattr(encoder, "needed_length", None)
    return tokens.shape[1] if needed_length is None else needed_length(tokens)


def padded_length(length: int, context_length: int, multiple: int = 8) -> int:
    """`length` rounded up to a multiple of `multiple`, at most the context length."""
    return min(context_length, -(-length // multiple) * multiple)


CLEANING = ("canonicalize", "lower", "whitespace")  # open_clip.tokenizer's cleaning functions


def check_clean(key: str, clean: str | None) -> None:
    if clean is not None and clean not in CLEANING:
        raise ValueError(f"{key}: expected one of {', '.join(CLEANING)} or null, got {clean!r}")


class HFTokenizer:
    """A picklable wrapper padding/truncating to a fixed length, as the batching code expects. `clean`
    (None: the text as given) cleans each caption first with open_clip's function of that name, so the
    ids equal open_clip's HFTokenizer(path, clean=...)."""

    def __init__(self, path: str, context_length: int, clean: str | None = None) -> None:
        transformers = require("transformers", "hf", "model.text_encoder=hf")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"model.text_encoder.tokenizer_path: no such directory {path}")
        check_clean("model.text_encoder.tokenizer_clean", clean)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.context_length, self.clean = context_length, clean

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self.clean:
            clean = libraries.open_clip().tokenizer.get_clean_fn(self.clean)
            texts = [clean(text) for text in texts]
        out = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return out["input_ids"]


class HFTextEncoder(nn.Module):
    """A Hugging Face text model loaded from a local directory; mean or CLS pooling, linear projection.
    Locked (LiT), its LayerNorms stay frozen even in the unlocked last blocks, as in open_clip.
    `trim_padding`: let the Trainer leave out the padding after the batch's longest caption (masked,
    so never read)."""

    def __init__(
        self,
        embed_dim: int,
        path: str,
        *,
        context_length: int = 77,
        pooling: str = "mean",
        proj_bias: bool = False,
        grad_checkpointing: bool = False,
        locked: bool = False,
        unlocked_blocks: int = 0,
        trim_padding: bool = True,
    ) -> None:
        super().__init__()
        transformers = require("transformers", "hf", "model.text_encoder=hf")
        AutoConfig, AutoModel = transformers.AutoConfig, transformers.AutoModel

        if not Path(path).is_dir():
            raise FileNotFoundError(f"model.text_encoder.path: no such directory {path}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"model.text_encoder.pooling: expected 'mean' or 'cls', got {pooling!r}")
        self.path, self.context_length, self.pooling = path, context_length, pooling
        self.trim_padding = trim_padding
        self.transformer = AutoModel.from_pretrained(path, local_files_only=True)
        self.pad_id = AutoConfig.from_pretrained(path, local_files_only=True).pad_token_id or 0
        self.width = self.transformer.config.hidden_size
        self.proj = nn.Linear(self.width, embed_dim, bias=proj_bias)
        self.return_pooled = False
        locking.set_grad_checkpointing(self.transformer, grad_checkpointing)
        blocks = self._blocks()
        locking.check_lock("model.text_encoder", locked, unlocked_blocks, len(blocks))
        if locked:
            unlocked = locking.last_blocks(blocks, unlocked_blocks)
            locking.lock(self.transformer, unlocked)
            locking.freeze_layer_norms(unlocked)

    def _blocks(self) -> nn.ModuleList:
        """The transformer's layer list: the module list as long as the config's layer count."""
        layers = self.transformer.config.num_hidden_layers
        lists = [m for m in self.transformer.modules() if isinstance(m, nn.ModuleList) and len(m) == layers]
        return lists[0] if lists else nn.ModuleList()

    def tokenizer(self) -> Tokenizer:
        return HFTokenizer(self.path, self.context_length)

    def needed_length(self, tokens: torch.Tensor) -> int:
        """Up to the batch's last token that is not padding: the attention mask hides the rest."""
        if not self.trim_padding:
            return tokens.shape[1]
        columns = (tokens != self.pad_id).any(dim=0).nonzero()
        return padded_length(int(columns.max()) + 1 if len(columns) else 1, tokens.shape[1])

    def forward(self, tokens: torch.Tensor) -> TextOutput:
        mask = (tokens != self.pad_id).long()
        hidden = self.transformer(input_ids=tokens, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return (pooled, self.proj(pooled)) if self.return_pooled else self.proj(pooled)
