import pytest
import torch

from tests.helpers.tiny import TEXT, VISION
from vlmtrain.losses.llip import LlipLoss
from vlmtrain.models.image_encoders import OpenClipVisionEncoder, TimmEncoder
from vlmtrain.models.llip_model import LlipModel
from vlmtrain.models.text_encoders import OpenClipTextEncoder
from vlmtrain.models.two_tower import TwoTower


def llip_model(image_encoder=None, chunk=256, **kwargs) -> LlipModel:
    torch.manual_seed(0)
    image_encoder = image_encoder or OpenClipVisionEncoder(32, vision_cfg=VISION, mixture_tokens=4)
    return LlipModel(
        image_encoder,
        OpenClipTextEncoder(32, text_cfg=TEXT),
        32,
        num_heads=2,
        eval_chunk_size=chunk,
        **kwargs,
    )


def batch(n=3):
    tokens = OpenClipTextEncoder(8, text_cfg=TEXT).tokenizer()([f"caption {i}" for i in range(n)])
    return torch.randn(n, 3, 32, 32), tokens


def test_forward_gives_what_the_llip_loss_needs_and_trains_every_parameter():
    model = llip_model()
    images, tokens = batch()
    out = model(images, tokens)
    assert out["image_keys"].shape == (3, 2, 4, 16) and out["text_queries"].shape == (3, 2, 16)
    loss = LlipLoss()(**out)
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert torch.isfinite(loss) and not unused, unused


@pytest.mark.parametrize("chunk", [1, 2, 256])
def test_similarity_equals_a_naive_per_pair_reference(chunk):
    model = llip_model(chunk=chunk, query_from="pooled").eval()  # queries from the pooled state, by hand
    images, tokens = batch(3)
    with torch.no_grad():
        scores = model.similarity(model.encode_image(images), model.encode_text(tokens))
        keys, values = model.head.encode_image(model.image_encoder(images))
        pooled, embedding = model.text_encoder(tokens)
        queries, features = model.head.encode_text(pooled), torch.nn.functional.normalize(embedding, dim=-1)
        for i in range(3):
            for j in range(3):
                mixed = model.head.mix(keys[i : i + 1], values[i : i + 1], queries[j : j + 1])[0, 0]
                assert scores[i, j].item() == pytest.approx((mixed @ features[j]).item(), abs=1e-6)


def test_similarity_temperature_can_be_swept():
    model = llip_model().eval()
    images, tokens = batch(2)
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(tokens)
        assert torch.equal(model.similarity(image, text), model.similarity(image, text, temperature=5.0))
        assert not torch.allclose(
            model.similarity(image, text), model.similarity(image, text, temperature=0.5)
        )


def test_class_average_keeps_the_caption_part_unit_norm():
    model = llip_model().eval()
    with torch.no_grad():
        average = model.average_text(model.encode_text(batch(3)[1]))
    assert average[:32].norm().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("layout", ["append", "replace_class"])
def test_timm_vit_mixture_tokens(layout):
    encoder = TimmEncoder(
        32,
        "vit_tiny_patch16_224",
        image_size=32,
        model_kwargs={"patch_size": 8, "depth": 1},
        mixture_tokens=4,
        mixture_layout=layout,
    )
    model = llip_model(encoder)
    out = model(*batch(2))
    assert out["image_values"].shape == (2, 2, 4, 16)
    # timm gives register tokens positions; replace_class drops the class token (K + P, else 1 + K + P)
    assert encoder.trunk.pos_embed.shape[1] == (4 + 16 if layout == "replace_class" else 1 + 4 + 16)


def test_tower_without_mixture_tokens_is_rejected():
    with pytest.raises(ValueError, match="mixture_tokens"):
        LlipModel(OpenClipVisionEncoder(32, vision_cfg=VISION), OpenClipTextEncoder(32, text_cfg=TEXT), 32)


def test_a_two_tower_model_refuses_a_tower_with_mixture_tokens():
    """Only Llip reads the K token states: a CLIP/SigLIP model given them would train on (B, K, E) features
    and fail at its first evaluation."""
    tower = OpenClipVisionEncoder(32, vision_cfg=VISION, mixture_tokens=4)
    with pytest.raises(ValueError, match=r"mixture_tokens: only the Llip model \(loss=llip\)"):
        TwoTower(tower, OpenClipTextEncoder(32, text_cfg=TEXT), 32)


def test_llip_eval_sweeps_temperatures_and_chunking_does_not_change_scores(synthetic_root):
    from vlmtrain.data.transforms import image_transform
    from vlmtrain.eval.suite import benchmark_records, run_evals

    transform = image_transform(32, (0.5,) * 3, (0.5,) * 3)
    zeroshot, val = str(synthetic_root / "classification"), str(synthetic_root / "val")
    results = {}
    for chunk in (7, 256):
        model = llip_model(chunk=chunk)
        tokenizer = model.text_encoder.tokenizer()
        results[chunk] = run_evals(
            model,
            tokenizer,
            transform,
            {"zeroshot": zeroshot},
            {"retrieval": val},
            batch_size=100,
            llip_temperatures=[1, 5],
        )
    # identical captions tie exactly in retrieval, and chunked float sums may break ties differently
    assert {k: v for k, v in results[7].items() if k.startswith("zeroshot")} == {
        k: v for k, v in results[256].items() if k.startswith("zeroshot")
    }
    found = results[7]
    assert found["zeroshot/tau=5/acc1"] == found["zeroshot/acc1"]  # the model's own tau is 5
    assert {"zeroshot/tau=1/acc1", "retrieval/tau=1/image_retrieval_recall@5"} <= set(found)
    records = benchmark_records(found, "m", {"zeroshot": zeroshot, "retrieval": val})
    assert len(records) == 6 and {r["task"] for r in records} == {
        "zeroshot_classification",
        "zeroshot_retrieval",
    }
    assert {r.get("llip_temperature") for r in records} == {None, 1.0, 5.0}
