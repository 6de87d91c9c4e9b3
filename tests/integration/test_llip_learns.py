"""Llip learns what it is for: trained like SigLIP (same towers, data, steps, optimizer and seed) on images
whose objects are each painted in two colours, with each caption naming one object's pair
(`vlmtrain.datasets.colour_pairs`), Llip finds more of an image's objects among its best-scoring pairs
(multi-object recall, `vlmtrain.eval.multi_object`) than SigLIP, by at least RECALL_LEAD.

One image vector has to sit near every caption of its image at once; Llip mixes its image tokens once per
caption, so it can keep, for each caption, which colours go together. A model that sees only which colours
are there finds a third of the objects (`bag_of_colours_recall`; chance 2/28 = 0.071).

Measured with these settings (one thread), over seeds 0 to 3: SigLIP 0.470, 0.482, 0.450, 0.480; Llip
(the model config's parameterisation with 32 mixture tokens) 0.522, 0.535, 0.528, 0.573, a lead of 0.052
to 0.093. Llip as published (query from the pooled text state) reaches 0.420 at seed 0, below SigLIP: the
test fails on that parameterisation (checked). With 16 tokens Llip's lead is larger (0.09 to 0.18), but
the published query trains there too (0.588) and the test would not see it. BENCHMARKS.md, "Which colours
go together", has the table.

Both models learn: their loss falls and their recall is far above chance (this is the suite's test that
SigLIP learns).

Slow: two 500-step trainings on 3,300 written images, about 80 CPU seconds with the imports.
"""

import pytest

from tests.helpers.runs import LOSSES as SHORT_RUN_LOSSES
from tests.helpers.runs import SMALL_MODEL, compose_train, read_metrics, run_training
from vlmtrain.checkpoint.load import load_pretrained
from vlmtrain.datasets.colour_pairs import write_colour_pairs
from vlmtrain.eval.multi_object import multi_object_recall

# lr 1e-3 over 100 warmup steps: the start at which Llip trains at every seed tried (BENCHMARKS.md)
SETTINGS = [
    "data.num_workers=1",
    "data.batch_size=64",
    "optim.lr=1e-3",
    "schedule.warmup_steps=100",
    "seed=0",
]
# the sigmoid losses' bias near -log(batch); Llip as the model config has it, with 32 mixture tokens
LOSSES = {
    "siglip": SHORT_RUN_LOSSES["siglip"],
    "llip": ["loss=llip", "model.init_logit_bias=-4", "model.image_encoder.mixture_tokens=32"],
}
STEPS = 500
CHANCE = 2 / 28  # 2 objects, 28 classes
RECALL_LEAD = 0.025  # about half the smallest lead measured over four seeds (0.052)


@pytest.fixture(scope="module")
def colour_pairs_root(tmp_path_factory):
    return write_colour_pairs(tmp_path_factory.mktemp("pairs") / "set", train_samples=3000, test_samples=300)


def recall_after_training(loss: str, root, run_dir) -> float:
    """Train `loss` on the set under `root` in `run_dir`; assert that it learned; its recall."""
    cfg = compose_train(
        [
            *SMALL_MODEL,
            *LOSSES[loss],
            *SETTINGS,
            "data.synthetic=null",
            "data.val_shards=null",
            "data.zeroshot_dir=null",
            f"data.train_shards={root / 'train'}",
            f"run_dir={run_dir}",
            f"trainer.max_steps={STEPS}",
        ]
    )
    run_training(cfg)
    model, transform, tokenizer = load_pretrained(run_dir)
    recall = multi_object_recall(model, tokenizer, transform, root)
    losses = [row["loss"] for row in read_metrics(run_dir) if "loss" in row]
    assert losses[-1] < losses[0] - 0.5 and recall > 3 * CHANCE, (loss, losses, recall)
    return recall


@pytest.mark.slow
def test_llip_finds_which_colours_go_together_better_than_siglip(colour_pairs_root, tmp_path):
    siglip = recall_after_training("siglip", colour_pairs_root, tmp_path / "siglip")
    llip = recall_after_training("llip", colour_pairs_root, tmp_path / "llip")
    assert llip > siglip + RECALL_LEAD, (llip, siglip)
