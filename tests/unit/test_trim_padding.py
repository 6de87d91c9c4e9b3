"""A text tower is handed only the token columns its output reads: the same features and gradients as
over the whole context, and the Trainer really hands over fewer columns."""

from pathlib import Path

import pytest
import torch

from tests.helpers.runs import config, read_metrics, run_training
from tests.helpers.tiny import TEXT
from vlmtrain.eval.zeroshot import encode_captions
from vlmtrain.models.image_encoders import OpenClipVisionEncoder
from vlmtrain.models.llip_model import LlipModel
from vlmtrain.models.text_encoders import HFTextEncoder, OpenClipTextEncoder, padded_length, text_columns
from vlmtrain.models.two_tower import TwoTower

CAPTIONS = ["a red circle", "a blue square at the top", "x"]
LONG = TEXT | {"context_length": 32}


def grads(module: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad()
    out = module(tokens)
    features = out[1] if isinstance(out, tuple) else out
    (features * torch.linspace(-1, 1, features.shape[-1])).sum().backward()
    named = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return features.detach(), named


def assert_same_as_whole_context(encoder: torch.nn.Module, tokens: torch.Tensor) -> None:
    length = encoder.needed_length(tokens)
    assert length < tokens.shape[1]
    whole, whole_grads = grads(encoder, tokens)
    trimmed, trimmed_grads = grads(encoder, tokens[:, :length])
    torch.testing.assert_close(trimmed, whole, atol=1e-5, rtol=1e-5)
    assert trimmed_grads.keys() == whole_grads.keys()
    for name, grad in whole_grads.items():
        torch.testing.assert_close(trimmed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_padded_length_rounds_up_to_multiples_of_8_within_the_context():
    assert [padded_length(n, 20) for n in (1, 8, 9, 16, 17, 20)] == [8, 8, 16, 16, 20, 20]


@pytest.mark.parametrize("pool_type", ["argmax", "eos", "first"])
def test_causal_open_clip_tower_reads_up_to_the_last_pooled_token(pool_type):
    torch.manual_seed(0)
    eos = 49407  # the CLIP tokenizer's end of text, for the "eos" pooling
    encoder = OpenClipTextEncoder(48, text_cfg=LONG | {"pool_type": pool_type, "eos_id": eos})
    tokens = encoder.tokenizer()(CAPTIONS)
    last = {
        "first": 0,
        "argmax": int(tokens.argmax(-1).max()),
        "eos": int((tokens == eos).int().argmax(-1).max()),
    }
    assert encoder.needed_length(tokens) == padded_length(last[pool_type] + 1, 32) < 32
    assert_same_as_whole_context(encoder, tokens)


def test_llip_queries_from_the_pooled_state_are_the_same_trimmed():
    torch.manual_seed(0)
    text = OpenClipTextEncoder(48, text_cfg=LONG)
    LlipModel(
        OpenClipVisionEncoder(
            48,
            vision_cfg={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
            mixture_tokens=4,
        ),
        text,
        48,
        query_from="pooled",
    )
    assert text.return_pooled
    assert_same_as_whole_context(text, text.tokenizer()(CAPTIONS))


def test_a_tower_that_reads_its_padding_gets_the_whole_context():
    siglip_like = OpenClipTextEncoder(48, text_cfg=LONG | {"no_causal_mask": True, "pool_type": "last"})
    tokens = siglip_like.tokenizer()(CAPTIONS)
    assert siglip_like.needed_length(tokens) == 32
    assert OpenClipTextEncoder(48, text_cfg=LONG, trim_padding=False).needed_length(tokens) == 32


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_hf_tower_leaves_out_its_masked_padding(tiny_bert, pooling):
    torch.manual_seed(0)
    encoder = HFTextEncoder(48, str(tiny_bert), context_length=32, pooling=pooling)
    tokens = encoder.tokenizer()(CAPTIONS)
    assert encoder.needed_length(tokens) == 8  # [CLS] + 6 words + [SEP]
    assert_same_as_whole_context(encoder, tokens)
    assert (
        HFTextEncoder(48, str(tiny_bert), context_length=32, trim_padding=False).needed_length(tokens) == 32
    )


def train_recording_lengths(cfg) -> tuple[list[int], list[float]]:
    """Train; the token columns the text tower got at each training step, and the logged losses."""
    lengths: list[int] = []
    original = OpenClipTextEncoder.forward

    def recording(self, tokens):
        assert tokens.is_contiguous()  # some Hugging Face models `view` their ids
        if torch.is_grad_enabled():  # training, not the evaluation at the end
            lengths.append(tokens.shape[1])
        return original(self, tokens)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(OpenClipTextEncoder, "forward", recording)
        run_training(cfg)
    return lengths, [row["loss"] for row in read_metrics(Path(cfg.run_dir)) if "loss" in row]


@pytest.mark.slow
def test_the_trainer_hands_the_text_tower_only_the_columns_it_reads_for_the_same_losses(
    synthetic_root, tmp_path
):
    runs = {}
    for trim in (True, False):
        cfg = config(
            synthetic_root,
            tmp_path / str(trim),
            "trainer.max_steps=3",
            "trainer.log_every=1",
            "data.batch_size=8",
            "model.text_encoder.context_length=32",
            f"model.text_encoder.trim_padding={str(trim).lower()}",
        )
        runs[trim] = train_recording_lengths(cfg)
    (trimmed, trimmed_losses), (whole, whole_losses) = runs[True], runs[False]
    assert len(trimmed) == 3 and all(n < 32 and n % 8 == 0 for n in trimmed) and whole == [32] * 3
    assert trimmed_losses == pytest.approx(whole_losses, rel=1e-5) and len(whole_losses) == 3


@torch.no_grad()
def test_evaluation_encodes_captions_with_only_the_columns_they_need():
    torch.manual_seed(0)
    vision = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
    model = TwoTower(OpenClipVisionEncoder(48, vision_cfg=vision), OpenClipTextEncoder(48, text_cfg=LONG), 48)
    tokenizer = model.text_encoder.tokenizer()
    lengths: list[int] = []
    model.text_encoder.register_forward_pre_hook(
        lambda module, args: lengths.append(args[0].shape[1] if args[0].is_contiguous() else -1)
    )
    trimmed = encode_captions(model, tokenizer, CAPTIONS)
    whole = model.encode_text(tokenizer(CAPTIONS))
    assert lengths == [8, 32]
    torch.testing.assert_close(trimmed, whole, atol=1e-6, rtol=1e-5)


def test_a_text_tower_that_does_not_say_gets_every_column():
    tokens = torch.zeros(2, 20, dtype=torch.long)
    assert text_columns(torch.nn.Linear(20, 4), tokens) == 20  # a user's own tower
    assert (
        text_columns(
            OpenClipTextEncoder(48, text_cfg=LONG),
            OpenClipTextEncoder(48, text_cfg=LONG).tokenizer()(CAPTIONS),
        )
        == 8
    )
