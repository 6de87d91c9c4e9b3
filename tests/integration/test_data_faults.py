"""Bad data in a real run: counted by reason in metrics.jsonl and the end-of-run summary, and a run whose
data is mostly bad stops in one line."""

import logging
import re

import pytest

from tests.helpers.runs import config, read_metrics, run_training
from tests.helpers.shards import corrupt_matrix, png_bytes, write_tar
from vlmtrain.data.accounting import DataError

COMMON = [
    "trainer.log_every=3",
    "data.num_workers=1",
    "data.val_shards=null",
    "data.zeroshot_dir=null",
]


@pytest.mark.slow
def test_a_run_over_every_kind_of_fault_finishes_and_counts_each(tmp_path, caplog):
    good, expected = corrupt_matrix(tmp_path / "data" / "train", seed=1)
    overrides = ["seed=1", "data.batch_size=6", "data.shuffle_buffer=0", f"trainer.max_steps={good // 6}"]
    with caplog.at_level(logging.INFO, logger="vlmtrain"):
        run_training(config(tmp_path / "data", tmp_path / "run", *COMMON, *overrides))
    last = read_metrics(tmp_path / "run")[-1]
    counts = {k: last[f"data/bad_{k}"] for k in expected} | {"samples_read": last["data/samples_read"]}
    assert counts == expected | {"samples_read": good + 5}
    assert f"data: {good + 5} samples read; bad: 2 image, 3 caption, 1 truncated, 1 unreadable" in caplog.text


@pytest.mark.slow
def test_thirty_percent_bad_stops_the_run_in_one_line(tmp_path):
    for s in range(4):
        samples = [
            {"__key__": f"{s}_{i}", "png": b"broken" if i % 10 < 3 else png_bytes(size=8), "txt": f"{i}"}
            for i in range(300)
        ]
        write_tar(tmp_path / "data" / "train" / f"{s}.tar", samples)
    overrides = ["data.batch_size=64", "trainer.max_steps=40", "data.samples_per_epoch=1200"]
    with pytest.raises(DataError) as error:
        run_training(config(tmp_path / "data", tmp_path / "run", *COMMON, *overrides))
    message = str(error.value)
    assert re.match(
        r"data.max_bad_fraction: (29|30)\.\d% of \d+ samples read were bad \(\d+ image, 0 caption, 0 truncated, 0 unreadable\)",
        message,
    )
    assert "more than 5.0%" in message and "\n" not in message
    assert re.search(r"worst shards: \S+/train/[0-3]\.tar \(\d+\)", message)
