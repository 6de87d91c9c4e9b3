"""Each loss trains the small model on the synthetic task to well above chance zero-shot accuracy."""

import pytest

from tests.helpers.runs import LOSSES, assert_learns


@pytest.mark.slow
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_short_run_learns_with_each_loss(loss, synthetic_root, tmp_path):
    assert_learns(loss, synthetic_root, tmp_path, "data.num_workers=1")
