"""CLIP and Llip train the small model on the synthetic task (the quickstart's data) to well above chance
zero-shot accuracy, CLIP's far above the untrained model's, and Llip's zero-shot top-1 is not far below
CLIP's. (SigLIP's learning is tested on its longer run in test_llip_learns.py, beside Llip's.)

Slow: each loss trains 300 steps once for the module (about 25 CPU seconds each with one thread).
"""

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tests.helpers.runs import assert_learned, config, short_run
from vlmtrain.data.transforms import transforms_for
from vlmtrain.eval.zeroshot import zeroshot_classification

# Measured with these settings (one thread): CLIP 0.290 and Llip 0.303 at seed 0, CLIP 0.323 and Llip 0.287
# at seed 1; Llip with the published pooled query 0.247 (0.223 with K=64 and 8 heads; seed 0). The margin
# is above the seed-to-seed spread: it catches a Llip that collapses (chance is 0.05), not the differences
# between its parameterisations.
ZERO_SHOT_MARGIN = 0.06  # how far Llip's zero-shot top-1 may fall below CLIP's


class ShortRuns:
    """loss -> (logged losses, final eval) of its short run, trained on first use; `run_dir(loss)`: where."""

    def __init__(self, synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.root, self.folders = synthetic_root, tmp_path_factory
        self.runs: dict[str, tuple[list[float], dict]] = {}
        self.run_dirs: dict[str, Path] = {}

    def __call__(self, loss: str) -> tuple[list[float], dict]:
        if loss not in self.runs:
            self.run_dirs[loss] = self.folders.mktemp(loss)
            self.runs[loss] = short_run(loss, self.root, self.run_dirs[loss], "data.num_workers=1")
        return self.runs[loss]

    def run_dir(self, loss: str) -> Path:
        self(loss)
        return self.run_dirs[loss]


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory) -> ShortRuns:
    return ShortRuns(synthetic_root, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["clip", "llip"])
def test_short_run_learns(loss, trained):
    assert_learned(*trained(loss))


@pytest.mark.slow
def test_llip_classifies_zero_shot_about_as_well_as_clip(trained):
    clip, llip = (trained(loss)[1]["zeroshot/acc1"] for loss in ("clip", "llip"))
    assert llip > clip - ZERO_SHOT_MARGIN, (llip, clip)


@pytest.mark.slow
def test_clip_learns_far_above_the_untrained_model_and_retrieves(trained, synthetic_root):
    results, run_dir = trained("clip")[1], trained.run_dir("clip")
    cfg = config(synthetic_root, run_dir)
    torch.manual_seed(cfg.seed)
    untrained = instantiate(cfg.model).eval()
    _, transform, _ = transforms_for(untrained.image_encoder)
    before = zeroshot_classification(
        untrained, untrained.text_encoder.tokenizer(), transform, synthetic_root / "classification"
    )
    chance = 1 / before["num_classes"]
    assert results["zeroshot/acc1"] > max(3 * chance, before["acc1"] + 0.15), (before, results)
    assert results["retrieval/image_retrieval_recall@10"] > 10 / 300
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 300
