"""UniBench, offline, evaluates a tiny CLIP and a tiny Llip on a local classification set and a relation
set through vlmtrain-eval's `unibench` option: its per-sample correctness equals vlmtrain-eval's own, with
a last batch of one image in both sets."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers.runs import restored_logging
from tests.helpers.shards import write_tar
from tests.helpers.tiny import save_tiny_checkpoint, tiny_model_config
from vlmtrain.cli import compose_checked, run_eval

pytest.importorskip("pkg_resources", reason="the unibench extra needs setuptools<81")
pytest.importorskip("unibench", reason="the unibench extra is not installed")
pd = pytest.importorskip("pandas")

BATCH = 4
CLASSES = ["red", "green", "blue", "cat", "dog", "ship"]  # >= 5: UniBench records top-1 predictions
IMAGES, RELATIONS = 9, 5  # batches of 4, 4, 1 and 4, 1


def noise_png(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("unibench-data")
    rng = np.random.default_rng(0)
    classification = root / "classification"
    (classification / "test").mkdir(parents=True)
    (classification / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (classification / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c}\n")
    samples = [{"__key__": f"img{i:03d}", "png": noise_png(rng), "cls": str(i % 6)} for i in range(IMAGES)]
    write_tar(classification / "test" / "0.tar", samples[:5])
    write_tar(classification / "test" / "1.tar", samples[5:])
    words = ["a dog on a mat", "a mat on a dog", "the red ship", "a ship in red", "blue cat", "cat of blue"]
    relation = [
        {
            "__key__": f"rel{i:03d}",
            "png": noise_png(rng),
            "json": json.dumps({"caption": words[i], "negatives": [words[i + 1], "a photo"]}),
        }
        for i in range(RELATIONS)
    ]
    write_tar(root / "relation" / "0.tar", relation)
    return root


def evaluate(data, checkpoint, out):
    overrides = [
        f"checkpoint={checkpoint}",
        f"+zeroshot.shapes={data / 'classification'}",
        f"+relation.order={data / 'relation'}",
        f"batch_size={BATCH}",
        "llip_temperatures=[]",
        "device=cpu",
        f"out={out / 'eval.json'}",
        "per_sample=true",
        "unibench.enabled=true",
        f"unibench.output_dir={out / 'unibench'}",
        f"unibench.benchmarks_dir={out / 'benchmarks'}",
    ]
    with restored_logging():
        return run_eval(compose_checked("eval", overrides))


def own_samples(out, name):
    lines = (out / "eval-samples" / f"{name}.jsonl").read_text().splitlines()
    return {row["key"]: row for row in map(json.loads, lines)}


def siglip_timm():
    """A sigmoid-loss model (logit bias) with a timm ViT image tower."""
    image = {
        "_target_": "vlmtrain.models.image_encoders.TimmEncoder",
        "embed_dim": 32,
        "model_name": "vit_tiny_patch16_224",
        "image_size": 32,
        "model_kwargs": {"patch_size": 8, "depth": 2},
    }
    return {**tiny_model_config(), "init_logit_bias": -4.0, "image_encoder": image}


MODELS = {"clip": tiny_model_config, "llip": lambda: tiny_model_config(llip=True), "siglip_timm": siglip_timm}


@pytest.mark.slow
@pytest.mark.parametrize("kind", MODELS)
def test_unibench_per_sample_correctness_equals_vlmtrain_eval(data, tmp_path, kind):
    run = tmp_path / kind
    checkpoint = save_tiny_checkpoint(run / "checkpoints" / "step_1.pt", MODELS[kind](), seed=3)
    results = evaluate(data, checkpoint, tmp_path)

    model_dir = tmp_path / "unibench" / f"{run.name}_step_1"
    for benchmark, own_name, count in (("shapes", "zeroshot-shapes", IMAGES), ("order", "relation-order", 5)):
        rows = pd.read_feather(model_dir / f"{benchmark}.f")
        own = own_samples(tmp_path, own_name)
        assert len(rows) == len(own) == count  # the last batch of one image is in
        theirs = dict(zip(rows["image_name"], rows["correctness"].astype(bool)))
        assert theirs == {key: row["correct"] for key, row in own.items()}
        if benchmark == "shapes":
            assert dict(zip(rows["image_name"], rows["predictions"])) == {
                key: row["predicted"] for key, row in own.items()
            }
        assert results[f"unibench/{benchmark}/acc"] == pytest.approx(rows["correctness"].mean())
    assert results["unibench/shapes/acc"] == pytest.approx(results["zeroshot/shapes/acc1"])
    assert results["unibench/order/acc"] == pytest.approx(results["relation/order/acc"])
    aggregate = pd.read_feather(tmp_path / "unibench" / "aggregate.f")
    assert set(aggregate["benchmark_name"]) == {"shapes", "order"}


def stage_cifar10(root, rng):
    """A 5-image stand-in for UniBench's cifar10, staged as UniBench reads it offline: benchmarks_dir/
    wds_cifar10 (a saved Hugging Face dataset with webp images) with its class names and templates."""
    datasets = pytest.importorskip("datasets")
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
    features = {"__key__": datasets.Value("string"), "webp": datasets.Image(), "cls": datasets.Value("int64")}
    columns = {"__key__": [f"c{i}" for i in range(5)], "webp": images, "cls": [3, 1, 4, 1, 5]}
    folder = root / "wds_cifar10"
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(str(folder))
    names = "airplane automobile bird cat deer dog frog horse ship truck".split()
    (folder / "classnames.txt").write_text("\n".join(names) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na blurry {c}.\n")
    return datasets.load_from_disk(str(folder)), names


@pytest.mark.slow
def test_unibench_own_benchmark_scores_llip_per_class(tmp_path, monkeypatch):
    """One of UniBench's own benchmarks, staged offline, scored by the Llip model: the image mixed for
    each class's prompts, as vlmtrain's zero-shot classifier does (batches of 4 and 1)."""
    import huggingface_hub.constants
    import torch

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the staged files, never the Hub

    from vlmtrain.checkpoint.load import load_pretrained
    from vlmtrain.eval.zeroshot import text_classifier

    staged, names = stage_cifar10(tmp_path / "benchmarks", np.random.default_rng(1))
    checkpoint = save_tiny_checkpoint(
        tmp_path / "llip" / "checkpoints" / "step_1.pt", tiny_model_config(True)
    )
    with restored_logging():
        overrides = [
            f"checkpoint={checkpoint}",
            f"batch_size={BATCH}",
            "llip_temperatures=[]",
            "device=cpu",
            f"out={tmp_path / 'eval.json'}",
            "unibench.enabled=true",
            "unibench.benchmarks=[cifar10]",
            f"unibench.output_dir={tmp_path / 'unibench'}",
            f"unibench.benchmarks_dir={tmp_path / 'benchmarks'}",
        ]
        run_eval(compose_checked("eval", overrides))
    rows = pd.read_feather(tmp_path / "unibench" / "llip_step_1" / "cifar10.f")

    model, transform, tokenizer = load_pretrained(checkpoint)
    templates = ["a photo of a {c}.", "a blurry {c}."]
    with torch.no_grad():
        classifier = text_classifier(model, tokenizer, names, templates)
        images = torch.stack([transform(item["webp"].convert("RGB")) for item in staged])
        predicted = model.similarity(model.encode_image(images), classifier).argmax(1)
    expected = {item["__key__"]: bool(p == item["cls"]) for item, p in zip(staged, predicted.tolist())}
    assert dict(zip(rows["image_name"], rows["correctness"].astype(bool))) == expected
    assert dict(zip(rows["image_name"], rows["predictions"])) == dict(
        zip(staged["__key__"], predicted.tolist())
    )
