"""CLIP_benchmark, run as its own CLI on an exported model, scores it exactly as vlmtrain does.

A tiny model is trained briefly (so its accuracy is well above chance and agreement means something),
exported to open_clip's local-dir format, and evaluated offline by `clip_benchmark eval` on the
synthetic zero-shot set, whose folder follows CLIP_benchmark's webdataset layout.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import vlmtrain
from tests.helpers.runs import compose_train, data_overrides, run_training
from vlmtrain.checkpoint.export import export
from vlmtrain.eval.zeroshot import read_task, text_classifier, zeroshot_classification

TINY_MODEL = [
    "model.embed_dim=64",
    "model.image_encoder.vision_cfg.image_size=32",
    "model.image_encoder.vision_cfg.patch_size=8",
    "model.image_encoder.vision_cfg.width=64",
    "model.image_encoder.vision_cfg.layers=2",
    "model.image_encoder.vision_cfg.head_width=32",
    "model.text_encoder.text_cfg.width=64",
    "model.text_encoder.text_cfg.heads=2",
    "model.text_encoder.text_cfg.layers=2",
    "model.text_encoder.text_cfg.context_length=16",
]
BRIEF_TRAINING = [
    "trainer.max_steps=60",
    "trainer.log_every=20",
    "trainer.wandb=false",
    "data.batch_size=64",
    "data.num_workers=0",
    "data.val_shards=null",
    "optim.lr=2e-3",
    "schedule.warmup_steps=10",
]
METRICS = ("acc1", "acc5", "mean_per_class_recall")


@pytest.fixture
def one_thread():
    """A model this small gains nothing from intra-op threads; on a small shared CPU they only cost."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def clip_benchmark(model_dir, dataset_dir, out_dir):
    """Run `clip_benchmark eval` offline on CPU in full precision; return its metrics and text classifier."""
    command = [
        *(sys.executable, "-m", "clip_benchmark.cli", "eval"),
        *("--model", f"local-dir:{model_dir}", "--pretrained", ""),
        *("--dataset", "wds/synthetic", "--dataset_root", str(dataset_dir)),
        *("--task", "zeroshot_classification", "--output", str(out_dir / "result.json")),
        *("--save_clf", str(out_dir / "classifier.pt")),
        *("--no_amp", "--num_workers", "0", "--batch_size", "64"),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=out_dir)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    metrics = json.loads((out_dir / "result.json").read_text())["metrics"]
    return metrics, torch.load(out_dir / "classifier.pt", weights_only=True)


@pytest.mark.slow
def test_clip_benchmark_scores_an_export_exactly_like_vlmtrain(synthetic_root, tmp_path, one_thread):
    zeroshot_dir = synthetic_root / "classification"
    cfg = compose_train(
        [*data_overrides(synthetic_root), *TINY_MODEL, *BRIEF_TRAINING, f"run_dir={tmp_path / 'run'}"]
    )
    during_training = run_training(cfg)
    assert export(tmp_path / "run", tmp_path / "export").format == "open_clip"

    theirs, their_classifier = clip_benchmark(tmp_path / "export", zeroshot_dir, tmp_path)

    model, transform, tokenizer = vlmtrain.load_pretrained(tmp_path / "export")
    ours = zeroshot_classification(model, tokenizer, transform, zeroshot_dir)
    assert ours["acc1"] > 3 / ours["num_classes"], ours  # trained: agreement is not two chance-level guesses
    for key in METRICS:
        assert theirs[key] == pytest.approx(ours[key], abs=1e-6), (key, theirs, ours)
        assert during_training[f"zeroshot/{key}"] == pytest.approx(ours[key], abs=1e-6), key
    classnames, templates = read_task(zeroshot_dir)
    our_classifier = text_classifier(model, tokenizer, classnames, templates)
    assert (their_classifier - our_classifier.T).abs().max().item() < 1e-6
