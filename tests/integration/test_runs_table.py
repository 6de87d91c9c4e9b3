"""vlmtrain-runs: a finished, a stopped and a failed run, each in its state, told apart by their config;
and a finished run's curves.png drawn from its metrics."""

import csv
import io
import json
import signal
import subprocess
import sys

import pytest
from PIL import Image

from tests.helpers.runs import config, read_metrics
from vlmtrain.commands.runs import runs
from vlmtrain.distributed.stop import RunStopped
from vlmtrain.report.plots import plot_runs
from vlmtrain.report.runs import runs_table
from vlmtrain.train.trainer import Trainer

SHORT = ["trainer.max_steps=3", "trainer.log_every=1", "data.batch_size=16", "data.num_workers=0"]
NO_EVAL = ["data.zeroshot_dir=null", "data.val_shards=null"]


def start(root, run_dir, *overrides):
    return Trainer.from_config(config(root, run_dir, *SHORT, *overrides))


@pytest.fixture(scope="module")
def sweep(synthetic_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    with start(
        synthetic_root, folder / "finished", "data.val_shards=null", "trainer.plot_curves=true"
    ) as trainer:
        trainer.train()
    with start(synthetic_root, folder / "stopped", *NO_EVAL, "optim.lr=1e-4") as trainer:
        trainer.stop.signum = signal.SIGTERM  # as if the scheduler had sent it: no step is taken
        with pytest.raises(RunStopped):
            trainer.train()
    with start(synthetic_root, folder / "failed", *NO_EVAL, "seed=3") as trainer:
        trainer._step = lambda *batch: (_ for _ in ()).throw(RuntimeError("CUDA out of memory.\nmore"))
        with pytest.raises(RuntimeError):
            trainer.train()
    return folder


@pytest.mark.slow
def test_finished_stopped_and_failed_runs_are_listed_in_their_state(sweep):
    rows = {row["name"]: row for row in runs_table(sweep)}
    assert list(rows) == ["failed", "finished", "stopped"]
    assert rows["finished"]["state"] == "finished" and rows["finished"]["step"] == 3
    assert rows["stopped"]["state"] == "stopped at step 0" and rows["stopped"]["max_steps"] == 3
    assert (
        rows["failed"]["state"] == "failed" and rows["failed"]["error"] == "RuntimeError: CUDA out of memory."
    )
    assert rows["finished"]["loss"] == read_metrics(sweep / "finished")[-2]["loss"]  # before the eval row
    assert 0 <= rows["finished"]["zeroshot/acc1"] <= 1 and "zeroshot/acc1" not in rows["stopped"]
    # the config values that differ are columns; those all runs share are not
    assert (
        rows["stopped"]["optim.lr"] == 1e-4 and rows["failed"]["seed"] == 3 and rows["finished"]["seed"] == 0
    )
    assert "trainer.max_steps" not in rows["finished"]


@pytest.mark.slow
def test_runs_command_prints_markdown_and_csv(sweep, capsys):
    runs([str(sweep)])
    lines = capsys.readouterr().out.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:5] == ["name", "state", "step", "loss", "samples_per_s"] and "zeroshot/acc1" in header
    assert "| finished | finished | 3/3 |" in lines[3] and "| stopped at step 0 | 0/3 |" in lines[4]
    runs([str(sweep), "--csv"])
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["state"] for row in table] == ["failed", "finished", "stopped at step 0"]
    assert "zeroshot/mean_per_class_recall" in table[1]  # CSV keeps every metric


@pytest.mark.slow
def test_running_run_whose_process_is_gone_is_failed(sweep, tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    status = json.loads((sweep / "finished" / "status.json").read_text())
    run = tmp_path / "killed"
    run.mkdir()
    (run / "status.json").write_text(json.dumps(status | {"state": "running", "pid": int(dead.stdout)}))
    assert runs_table(tmp_path)[0]["state"] == "failed"
    (run / "status.json").write_text(json.dumps(status | {"state": "running", "pid": 1}))
    assert runs_table(tmp_path)[0]["state"] == "running"


@pytest.mark.slow
def test_a_finished_run_draws_its_curves(sweep):
    assert Image.open(sweep / "finished" / "curves.png").format == "PNG"
    rows = read_metrics(sweep / "finished")
    figure = plot_runs({"finished": rows})
    lines = {axes.get_title(): axes.get_lines() for axes in figure.axes}
    for metric in ("loss", "lr", "logit_scale", "grad_norm", "data_wait", "zeroshot/acc1"):
        assert len(lines[metric]) == 1, metric
        logged = [row[metric] for row in rows if metric in row]
        assert list(lines[metric][0].get_ydata()) == pytest.approx(logged), metric
