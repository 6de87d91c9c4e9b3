"""The handwritten-digits example: real scans become shards, and a short CPU run learns them zero-shot."""

import io
import json

import pytest
from PIL import Image

from tests.helpers.runs import compose_train, read_metrics, run_cli, run_training
from vlmtrain import cli
from vlmtrain.data.shards import expand_shards, read_shard
from vlmtrain.datasets.digits import WORDS, write_digits

SHORT_RUN = [  # the experiment, smaller and shorter
    "model.image_encoder.vision_cfg.layers=2",
    "trainer.max_steps=100",
    "data.batch_size=64",
    "schedule.warmup_steps=10",
    "trainer.wandb=false",
]


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "digits"
    write_digits(root, copies=2, samples_per_shard=500)
    return root


def samples(folder):
    return [
        raw for shard in expand_shards(str(folder)) for raw in read_shard(shard, on_error=lambda e: False)
    ]


@pytest.mark.slow
def test_digits_split_is_stratified_disjoint_and_deterministic(digits_root, tmp_path):
    info = json.loads((digits_root / "info.json").read_text())
    assert info["train_scans"] + info["held_out"] == 1797 and 350 < info["held_out"] < 450
    train = samples(digits_root / "train")
    assert (
        len(train)
        == 2 * info["train_scans"]
        == sum(json.loads((digits_root / "train/sizes.json").read_text()).values())
    )
    train_scans = {json.loads(s["json"])["index"] for s in train}
    test = samples(digits_root / "classification" / "test")
    test_scans = {int(s["__key__"]) for s in test}
    assert len(test_scans) == info["held_out"] and not train_scans & test_scans
    labels = [int(s["cls"]) for s in test]
    assert all(30 <= labels.count(d) <= 45 for d in range(10))  # each digit keeps its share

    first = train[0]
    digit = json.loads(first["json"])["label"]
    assert f"the number {digit}" in first["txt"].decode() and WORDS[digit] in first["txt"].decode()
    assert Image.open(io.BytesIO(first["png"])).size == (32, 32)
    assert (digits_root / "classification/classnames.txt").read_text().split() == list(WORDS)
    assert len(samples(digits_root / "val")) == info["held_out"]

    again = write_digits(tmp_path / "again", copies=2, samples_per_shard=500)
    assert again["held_out"] == info["held_out"]
    for shard in ("train/000000.tar", "classification/test/0.tar"):
        assert (tmp_path / "again" / shard).read_bytes() == (digits_root / shard).read_bytes()


@pytest.mark.slow
def test_short_run_on_digits_is_far_above_chance(digits_root, tmp_path):
    cfg = compose_train(
        [
            "experiment=digits",
            f"data.train_shards={digits_root / 'train'}",
            f"data.val_shards={digits_root / 'val'}",
            f"data.zeroshot_dir={digits_root / 'classification'}",
            f"run_dir={tmp_path}",
            *SHORT_RUN,
        ]
    )
    results = run_training(cfg)
    assert results["zeroshot/num_classes"] == 10
    assert results["zeroshot/acc1"] > 0.3, results  # chance is 0.1


@pytest.mark.slow
def test_running_the_experiment_again_resumes_it(digits_root, tmp_path, monkeypatch, capsys):
    """`vlmtrain-train experiment=digits` twice (the entry point, in this process): the experiment's name
    fixes runs/digits, so the second command finds the first one's checkpoint instead of starting a new
    timestamped run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLMTRAIN_CACHE", str(digits_root.parent))
    first, second = (
        run_cli(cli.train, ["experiment=digits", "trainer.max_steps=3"], capsys) for _ in range(2)
    )
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    assert "(a new run)" in first.stdout + first.stderr
    latest = tmp_path / "runs" / "digits" / "checkpoints" / "step_00000003.pt"
    assert f"resumed from {latest}" in second.stdout + second.stderr
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["digits"]
    steps = [row["step"] for row in read_metrics(tmp_path / "runs" / "digits") if "loss" in row]
    assert steps == [3]  # the second command trained no step again
