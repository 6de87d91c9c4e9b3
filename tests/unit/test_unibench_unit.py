"""Relation sets and per-sample records in vlmtrain's own evaluation; the UniBench extra's one-line error
when it is missing; the adapter's handling of a batch of one image, which UniBench's own handler fails."""

import io
import json
import sys

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from tests.helpers.shards import write_tar
from tests.helpers.tiny import tiny_model_config
from vlmtrain.eval.relation import relation_sweep
from vlmtrain.eval.suite import run_evals
from vlmtrain.extras import MissingExtra


def png(seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny(llip: bool = False):
    torch.manual_seed(0)
    model = instantiate(OmegaConf.create(tiny_model_config(llip))).eval()
    from vlmtrain.data.transforms import transforms_for

    return model, transforms_for(model.image_encoder)[1], model.text_encoder.tokenizer()


def relation_tar(path, count=3, negatives=2):
    samples = [
        {
            "__key__": f"s{i}",
            "png": png(i),
            "json": json.dumps(
                {"caption": f"caption {i}", "negatives": [f"wrong {i} {j}" for j in range(negatives)]}
            ),
        }
        for i in range(count)
    ]
    return write_tar(path, samples)


@pytest.mark.slow
def test_relation_records_pick_the_best_scored_caption_per_pair(tmp_path):
    model, transform, tokenizer = tiny(llip=True)
    shard = relation_tar(tmp_path / "rel.tar")
    samples: dict[str, list[dict]] = {}
    results = run_evals(
        model,
        tokenizer,
        transform,
        {},
        {},
        batch_size=2,
        relation={"relation/r": str(shard)},
        samples=samples,
    )
    records = samples["relation/r"]
    assert [r["key"] for r in records] == ["s0", "s1", "s2"]  # batches of 2 and 1
    assert results["relation/r/acc"] == pytest.approx(sum(r["correct"] for r in records) / 3)
    with torch.no_grad():  # each pair scored on its own: image i with its 3 captions
        for i, record in enumerate(records):
            image = model.encode_image(transform(Image.open(io.BytesIO(png(i))).convert("RGB"))[None])
            texts = model.encode_text(tokenizer([f"caption {i}", f"wrong {i} 0", f"wrong {i} 1"]))
            assert record["predicted"] == int(model.similarity(image, texts)[0].argmax())


def test_relation_samples_must_be_well_formed(tmp_path):
    model, transform, tokenizer = tiny()
    write_tar(tmp_path / "bad.tar", [{"__key__": "x", "png": png(0), "json": json.dumps({"caption": "a"})}])
    with pytest.raises(ValueError, match=r"relation sample x in .*bad.tar: .json needs"):
        relation_sweep(model, tokenizer, transform, str(tmp_path / "bad.tar"))
    relation_tar(tmp_path / "a.tar", count=1, negatives=1)
    relation_tar(tmp_path / "b.tar", count=1, negatives=2)
    with pytest.raises(ValueError, match="2 negatives, the set's first sample has 1"):
        relation_sweep(model, tokenizer, transform, f"{tmp_path / 'a.tar'}::{tmp_path / 'b.tar'}")


def test_missing_unibench_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    from vlmtrain.eval.unibench import check_unibench

    monkeypatch.setitem(sys.modules, "unibench", None)
    with pytest.raises(
        MissingExtra, match=r"unibench.enabled=true: needs .*pip install 'vlmtrain\[unibench\]'"
    ):
        check_unibench([])


@pytest.mark.slow
def test_a_batch_of_one_image_gives_one_row_where_unibench_alone_fails():
    pytest.importorskip("pkg_resources")
    handlers = pytest.importorskip("unibench.benchmarks_zoo.wrappers.bechmark_handler")
    from vlmtrain.eval.unibench.adapter import VlmtrainModel, ZeroShotHandler

    model, transform, tokenizer = tiny()
    wrapped = VlmtrainModel(model, "tiny", transform, tokenizer, device="cpu")
    classes, templates = ["a", "b", "c", "d", "e", "f"], ["a photo of {c}"]
    image = transform(Image.open(io.BytesIO(png(0))).convert("RGB"))[None]
    batch = [image, torch.tensor([2]), ["k0"]]

    ours = ZeroShotHandler("one", None, classes, templates)
    ours.on_validation_start(wrapped)
    row = ours.eval_batch(wrapped, batch)
    assert row["image_name"] == ["k0"] and len(row["correctness"]) == len(row["predictions_top5"]) == 1
    assert row["predictions"] == [
        int(model.similarity(model.encode_image(image), wrapped.zeroshot_weights).argmax())
    ]

    stock = handlers.ZeroShotBenchmarkHandler("one", None, classes, templates)
    wrapped.zeroshot_weights = wrapped.zeroshot_weights.T  # the (dim, classes) layout UniBench's own expects
    with pytest.raises(IndexError):
        stock.eval_batch(wrapped, batch)
