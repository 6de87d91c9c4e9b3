"""Each loss trains the small model on the synthetic task (the quickstart's data) to well above chance
zero-shot accuracy, and Llip's zero-shot top-1 is not far below CLIP's.

Slow: each loss trains 300 steps once for the module (about 25 CPU seconds each with one thread).
"""

import pytest

from tests.helpers.runs import LOSSES, assert_learned, short_run

# Measured with these settings (one thread): CLIP 0.290 and Llip 0.303 at seed 0, CLIP 0.323 and Llip 0.287
# at seed 1; Llip with the published pooled query 0.247 (0.223 with K=64 and 8 heads; seed 0). The margin
# is above the seed-to-seed spread: it catches a Llip that collapses (chance is 0.05), not the differences
# between its parameterisations.
ZERO_SHOT_MARGIN = 0.06  # how far Llip's zero-shot top-1 may fall below CLIP's


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """loss -> (logged losses, final eval) of its short run, trained on first use."""
    runs = {}

    def train(loss: str) -> tuple[list[float], dict]:
        if loss not in runs:
            runs[loss] = short_run(loss, synthetic_root, tmp_path_factory.mktemp(loss), "data.num_workers=1")
        return runs[loss]

    return train


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["clip", *sorted(LOSSES)])
def test_short_run_learns_with_each_loss(loss, trained):
    assert_learned(*trained(loss))


@pytest.mark.slow
def test_llip_classifies_zero_shot_about_as_well_as_clip(trained):
    clip, llip = (trained(loss)[1]["zeroshot/acc1"] for loss in ("clip", "llip"))
    assert llip > clip - ZERO_SHOT_MARGIN, (llip, clip)
