"""Llip keeps learning what it is for: trained like SigLIP (same towers, data, steps, optimizer and seed)
on images whose captions each name one of their two objects, its multi-object recall
(`vlmtrain.eval.multi_object`; chance 0.20) is not more than RECALL_MARGIN below SigLIP's.

Measured with these settings (one thread): SigLIP 0.550; Llip with the model config's parameterisation
and 32 mixture tokens 0.532 (64 tokens: 0.562); Llip as published (query from the pooled text state) with
32 tokens 0.198 (64: 0.240), its text tower collapsed at the all-negative plateau: the test fails on that
parameterisation (checked). 32 tokens rather than the model config's 64 cost a quarter less CPU time and
still show the stall; with 16 the pooled query trains (0.555) and the test would not see it.
Both models stop at the recall of a model that sees colours only (0.563 here): at this scale neither
tells a circle from a square, so Llip matches SigLIP and cannot beat it. A joint space too narrow for
one image vector to rank every pair of colours first (2 dimensions: one vector's recall is at most 0.78 on
the colours-only set, Llip's 1.0) is where Llip should win, but there both models stay at the all-negative
plateau (SigLIP 0.41, Llip 0.40, chance 0.40; 0.40 and 0.39 with seed 1; SigLIP even with one object
per image). BENCHMARKS.md, "Llip and caption diversity", has the ablations.

Slow: two 200-step trainings on 3,300 written images, about 50 CPU seconds with the imports.
"""

import pytest

from tests.helpers.runs import SMALL_MODEL, compose_train, run_training
from vlmtrain.checkpoint.load import load_pretrained
from vlmtrain.datasets.multi_object import write_multi_object
from vlmtrain.eval.multi_object import multi_object_recall

SHORT = ["data.num_workers=1", "data.batch_size=64", "optim.lr=2e-3", "schedule.warmup_steps=20", "seed=0"]
# The model config's Llip (its parameterisation, 8 heads) with 32 mixture tokens; the sigmoid losses' bias
# near -log(batch)
LOSSES = {
    "siglip": ["loss=siglip", "model.init_logit_bias=-4"],
    "llip": ["loss=llip", "model.init_logit_bias=-4", "model.image_encoder.mixture_tokens=32"],
}
RECALL_MARGIN = 0.05  # how far Llip's multi-object recall may fall below SigLIP's


@pytest.fixture(scope="module")
def multi_object_root(tmp_path_factory):
    return write_multi_object(
        tmp_path_factory.mktemp("mo") / "set", train_samples=3000, test_samples=300, objects=2, seed=0
    )


def recall_after_training(loss: str, root, run_dir, steps: int) -> float:
    cfg = compose_train(
        [
            *SMALL_MODEL,
            *LOSSES[loss],
            *SHORT,
            "data.synthetic=null",
            "data.val_shards=null",
            "data.zeroshot_dir=null",
            f"data.train_shards={root / 'train'}",
            f"run_dir={run_dir}",
            f"trainer.max_steps={steps}",
        ]
    )
    run_training(cfg)
    model, transform, tokenizer = load_pretrained(run_dir)
    return multi_object_recall(model, tokenizer, transform, root)


@pytest.mark.slow
def test_llip_recalls_an_images_objects_as_well_as_siglip(multi_object_root, tmp_path):
    siglip = recall_after_training("siglip", multi_object_root, tmp_path / "siglip", 200)
    llip = recall_after_training("llip", multi_object_root, tmp_path / "llip", 200)
    assert llip > siglip - RECALL_MARGIN, (llip, siglip)
