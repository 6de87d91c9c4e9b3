"""Evaluation on every rank: zero-shot, retrieval and relation sets split over 2 real gloo ranks give the
metrics and per-sample records of one process, for the plain model (as under DDP) and for the model
sharded with FSDP (where every rank must take part in each forward: a rank running fewer forwards
would leave the others waiting until the group's timeout)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from tests.helpers.ranks import fork_ranks
from tests.helpers.tiny import tiny_model_config
from vlmtrain.data.transforms import transforms_for
from vlmtrain.datasets.synthetic import write_shards
from vlmtrain.distributed.sharding import shard_model
from vlmtrain.eval.suite import run_evals

# Odd numbers of classes and of batches (of 4): the last round leaves a rank without a batch of its own.
CLASSES, ZEROSHOT_IMAGES, RETRIEVAL_IMAGES, RELATION_IMAGES, BATCH = 5, 13, 9, 11, 4
TEMPERATURES = (0.5,)  # a Llip sweep: the model's own temperature and this one


def _png(seed: int) -> bytes:
    pixels = torch.randint(0, 256, (40, 40, 3), generator=torch.Generator().manual_seed(seed))
    buffer = io.BytesIO()
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def write_sets(root: Path) -> dict[str, dict[str, str]]:
    zeroshot = root / "zeroshot"
    (zeroshot / "test").mkdir(parents=True)
    (zeroshot / "classnames.txt").write_text("\n".join(f"class {c}" for c in range(CLASSES)) + "\n")
    (zeroshot / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c}.\n")
    labelled = [{"__key__": f"z{i}", "png": _png(i), "cls": str(i % CLASSES)} for i in range(ZEROSHOT_IMAGES)]
    write_shards(str(zeroshot / "test" / "%d.tar"), labelled)
    captioned = [
        {
            "__key__": f"r{i}",
            "png": _png(100 + i),
            "txt": "\n".join(f"caption {i} {j}" for j in range(1 + i % 2)),
        }
        for i in range(RETRIEVAL_IMAGES)
    ]
    (root / "retrieval").mkdir()
    write_shards(str(root / "retrieval" / "%d.tar"), captioned)
    options = [
        {
            "__key__": f"s{i}",
            "png": _png(200 + i),
            "json": json.dumps({"caption": f"true {i}", "negatives": [f"wrong {i}", f"other {i}"]}),
        }
        for i in range(RELATION_IMAGES)
    ]
    (root / "relation").mkdir()
    write_shards(str(root / "relation" / "%d.tar"), options)
    return {
        "zeroshot": {"zeroshot/z": str(zeroshot)},
        "retrieval": {"retrieval/r": str(root / "retrieval")},
        "relation": {"relation/s": str(root / "relation")},
    }


def evaluate(sets: dict[str, dict[str, str]], sharded: bool = False) -> dict:
    torch.manual_seed(0)
    model = instantiate(OmegaConf.create(tiny_model_config(llip=True)))
    transform = transforms_for(model.image_encoder)[1]
    tokenizer = model.text_encoder.tokenizer()
    if sharded:
        model = shard_model(model, mixed_precision=False)
    embedded = count_images(model)
    samples: dict[str, list[dict]] = {}
    results = run_evals(
        model,
        tokenizer,
        transform,
        sets["zeroshot"],
        sets["retrieval"],
        relation=sets["relation"],
        batch_size=BATCH,
        llip_temperatures=TEMPERATURES,
        samples=samples,
    )
    return {"results": results, "samples": samples, "embedded": embedded}


def count_images(model: torch.nn.Module) -> list[int]:
    """The number of images of each `encode_image` call, appended as the model is called."""
    calls, encode = [], model.encode_image

    def counted(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return encode(images)

    model.encode_image = counted
    return calls


def batches(images: int) -> int:
    return -(-images // BATCH)


def _rank(rank: int, world: int, sets: dict) -> dict:
    return {"plain": evaluate(sets), "sharded": evaluate(sets, sharded=True)}


@pytest.mark.slow
def test_two_ranks_give_the_metrics_and_records_of_one(tmp_path: Path) -> None:
    """Slow (~5 s, more if it starts the ranks' fork server): a tiny Llip model evaluated in one
    process, then on 2 ranks, plain and sharded."""
    sets = write_sets(tmp_path / "sets")
    one = evaluate(sets)
    assert one["results"]["zeroshot/z/num_samples"] == ZEROSHOT_IMAGES
    assert one["results"]["relation/s/num_samples"] == RELATION_IMAGES
    assert "retrieval/r/tau=0.5/image_retrieval_recall@1" in one["results"]
    assert [len(one["samples"][k]) for k in ("zeroshot/z", "relation/s")] == [
        ZEROSHOT_IMAGES,
        RELATION_IMAGES,
    ]
    (tmp_path / "ranks").mkdir()
    ranks = fork_ranks(_rank, 2, tmp_path / "ranks", sets)
    # each rank embeds about half of the images, in as many calls as the other (padded)
    calls = sum(-(-batches(n) // 2) for n in (ZEROSHOT_IMAGES, RETRIEVAL_IMAGES, RELATION_IMAGES))
    for model in ("plain", "sharded"):
        assert [len(rank[model]["embedded"]) for rank in ranks] == [calls, calls]
        # rank 0: 8 + 5 + 7 of 13, 9 and 11 images; rank 1: 5 + 4 + 4, and two sets' short last batch again
        assert [sum(rank[model]["embedded"]) for rank in ranks] == [20, 17]
        for rank in ranks:  # every rank gets every result
            assert rank[model]["samples"] == one["samples"]
            assert rank[model]["results"].keys() == one["results"].keys()
            for key, value in one["results"].items():
                assert rank[model]["results"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (model, key)
