"""Named evaluation sets: each is evaluated during training and by vlmtrain-eval, under its own name."""

import json

import pytest

from tests.helpers.runs import config, read_metrics, run_cli, run_training
from vlmtrain import cli
from vlmtrain.eval.suite import format_report, parse_key, temperature_table
from vlmtrain.schema import ConfigError, DataConfig


@pytest.mark.slow
def test_two_named_zeroshot_sets_are_logged_under_their_names(synthetic_root, tmp_path, capsys):
    classification = synthetic_root / "classification"
    cfg = config(
        synthetic_root,
        tmp_path,
        "trainer.max_steps=1",
        "data.batch_size=16",
        "data.num_workers=0",
        "data.zeroshot_dir=null",
        "data.val_shards=null",
        f"+data.zeroshot.shapes={classification}",
        f"+data.zeroshot.shapes_again={classification}",
        f"+data.retrieval.captions={synthetic_root / 'val'}",
    )
    results = run_training(cfg)

    evals = [row for row in read_metrics(tmp_path) if "zeroshot/shapes/acc1" in row]
    assert [row["step"] for row in evals] == [1]
    for name in ("shapes", "shapes_again"):
        assert (
            0 <= evals[-1][f"zeroshot/{name}/acc1"] <= 1 and evals[-1][f"zeroshot/{name}/num_samples"] == 300
        )
    assert results["zeroshot/shapes/acc1"] == results["zeroshot/shapes_again/acc1"]  # the same data
    assert "retrieval/captions/image_retrieval_recall@1" in results
    assert not any(key.startswith(("zeroshot/acc1", "retrieval/image")) for key in results)

    out = tmp_path / "eval-out.json"
    # vlmtrain-eval: named zero-shot sets given replace the run's; its retrieval set is kept
    argv = [f"checkpoint={tmp_path}", f"out={out}", f"+zeroshot.only={classification}"]
    done = run_cli(cli.evaluate, argv, capsys)  # the entry point, in this process
    assert done.returncode == 0, done.stderr
    written = json.loads(out.read_text())
    assert written["metrics"]["zeroshot/only/acc1"] == pytest.approx(results["zeroshot/shapes/acc1"])
    assert {record.get("name") for record in written["results"]} == {"only", "captions"}


def test_metric_keys_name_task_set_temperature_and_metric():
    assert parse_key("zeroshot/acc1") == ("zeroshot", "", None, "acc1")
    assert parse_key("zeroshot/tau=3/acc1") == ("zeroshot", "", 3.0, "acc1")
    assert parse_key("retrieval/coco/tau=0.5/image_retrieval_recall@1") == (
        "retrieval",
        "coco",
        0.5,
        "image_retrieval_recall@1",
    )
    assert parse_key("loss") is None and parse_key("train/loss") is None


def test_llip_sweep_is_one_table_of_sets_by_temperature():
    results = {
        "zeroshot/acc1": 0.5,
        "zeroshot/tau=1/acc1": 0.25,
        "zeroshot/tau=5/acc1": 0.5,
        "zeroshot/imagenet/acc1": 0.125,
        "zeroshot/imagenet/tau=1/acc1": 0.0625,
        "zeroshot/imagenet/tau=5/acc1": 0.125,
        "zeroshot/imagenet/tau=5/num_samples": 8,
    }
    lines = temperature_table(results).splitlines()
    assert lines[0] == "| set metric | model | tau=1 | tau=5 |"
    assert lines[2:] == [
        "| zeroshot acc1 | 0.5000 | 0.2500 | 0.5000 |",
        "| zeroshot/imagenet acc1 | 0.1250 | 0.0625 | 0.1250 |",
    ]
    assert temperature_table({"zeroshot/acc1": 0.5}) == ""
    report = format_report(results).splitlines()  # the sweep only in the table, not line by line
    assert len(report) == 2 + 4 and not any("tau=" in line for line in report[:2])


@pytest.mark.parametrize("name", ["a/b", "tau=1", ""])
def test_set_names_that_would_break_metric_keys_are_rejected(name):
    with pytest.raises(ConfigError, match="data.zeroshot"):
        DataConfig(train_shards="x", zeroshot={name: "/data"})
