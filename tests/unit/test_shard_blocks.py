"""Which modules `shard_model` shards one by one: each tower's transformer blocks, found without naming
the model family (timm and Hugging Face towers here; open_clip's in the sharded training tests)."""

from __future__ import annotations

import pytest
from torch import nn

from vlmtrain.distributed.sharding import tower_blocks


@pytest.mark.slow
def test_timm_vit_blocks() -> None:
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=3)
    assert [id(b) for b in tower_blocks(vit)] == [id(b) for b in vit.blocks]


@pytest.mark.slow
def test_hugging_face_encoder_layers() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32
    )
    bert = transformers.BertModel(config)
    assert [id(b) for b in tower_blocks(bert)] == [id(b) for b in bert.encoder.layer]


def test_a_tower_without_blocks_has_none() -> None:
    """An MLP's layers differ in kind (Linear, GELU): not blocks; the tower is sharded with the root."""
    assert tower_blocks(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))) == []
    assert tower_blocks(nn.Linear(4, 4)) == []


def test_the_largest_list_of_alike_modules_wins() -> None:
    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)) for _ in range(2)])

    tower = Tower()
    assert tower_blocks(tower) == list(tower.blocks)
