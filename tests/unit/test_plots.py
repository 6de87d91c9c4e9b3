import json
from pathlib import Path

from PIL import Image

from vlmtrain.commands.plot import plot, run_labels
from vlmtrain.report.plots import TRAIN_METRICS, curves, plot_runs, read_metrics, write_run_plot


def write_metrics(run_dir, scale=1.0):
    run_dir.mkdir(parents=True)
    rows = []
    for step in (10, 20, 30):
        rows.append(
            {
                "step": step,
                "time": 0.0,
                "epoch": 0,
                **{name: scale * step * (i + 1) for i, name in enumerate(TRAIN_METRICS)},
            }
        )
    rows.append({"step": 20, "loss": -1.0})  # a resumed run repeats step 20: the later value counts
    rows.append({"step": 30, "zeroshot/acc1": 0.5 * scale, "zeroshot/num_samples": 300})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 40, "lo')
    return rows


def panels(figure):
    return {axes.get_title(): axes for axes in figure.axes}


def test_one_panel_per_metric_with_the_logged_values(tmp_path):
    write_metrics(tmp_path / "run")
    rows = read_metrics(tmp_path / "run")  # the half-written last line is skipped
    assert len(rows) == 5
    assert curves(rows)["loss"] == ([10, 20, 30], [10.0, -1.0, 30.0])

    png = write_run_plot(tmp_path / "run")
    assert png == tmp_path / "run" / "curves.png" and Image.open(png).format == "PNG"
    found = panels(plot_runs({"run": rows}))
    assert list(found) == [*TRAIN_METRICS, "zeroshot/acc1"]  # no counts, time or epoch
    for axes in found.values():
        assert len(axes.get_lines()) == 1
    line = found["grad_norm"].get_lines()[0]
    assert list(line.get_xdata()) == [10, 20, 30] and list(line.get_ydata()) == [50.0, 100.0, 150.0]
    assert list(found["zeroshot/acc1"].get_lines()[0].get_ydata()) == [0.5]


def test_plot_command_overlays_runs_one_line_each(tmp_path, capsys):
    for index in range(2):
        write_metrics(tmp_path / "sweep" / str(index), scale=index + 1)
    out = tmp_path / "sweep.png"
    plot([str(tmp_path / "sweep"), "--out", str(out)])  # the folder holding the runs
    assert "2 runs" in capsys.readouterr().out and Image.open(out).format == "PNG"
    figure = plot_runs({"0": read_metrics(tmp_path / "sweep/0"), "1": read_metrics(tmp_path / "sweep/1")})
    acc = panels(figure)["zeroshot/acc1"].get_lines()
    assert [line.get_label() for line in acc] == ["0", "1"]
    assert [list(line.get_ydata()) for line in acc] == [[0.5], [1.0]]
    only = panels(plot_runs({"0": read_metrics(tmp_path / "sweep/0")}, metrics=["acc1"]))
    assert list(only) == ["zeroshot/acc1"]


def test_a_sweeps_lines_are_named_by_the_values_that_differ(tmp_path, capsys):
    for index, lr in enumerate(("1e-3", "3e-3")):
        write_metrics(tmp_path / "sw" / str(index), scale=index + 1)
        (tmp_path / "sw" / str(index) / ".hydra").mkdir()
        overrides = f"- optim.lr={lr}\n- trainer.max_steps=30\n"  # the sweep's point, and what all share
        (tmp_path / "sw" / str(index) / ".hydra" / "overrides.yaml").write_text(overrides)
    labels = run_labels([tmp_path / "sw" / "0", tmp_path / "sw" / "1"])
    assert list(labels.values()) == ["optim.lr=1e-3", "optim.lr=3e-3"]
    figure = plot_runs({label: read_metrics(run) for run, label in labels.items()})
    legend = figure.axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["optim.lr=1e-3", "optim.lr=3e-3"]
    plot([str(tmp_path / "sw"), "--out", str(tmp_path / "sw.png")])
    assert "2 runs" in capsys.readouterr().out


def test_runs_alike_in_every_setting_keep_their_paths():
    assert list(run_labels([Path("sw/0"), Path("sw/1")]).values()) == ["0", "1"]


def test_step_ticks_are_whole_steps_even_for_one_point():
    figure = plot_runs({"run": [{"step": 20, "zeroshot/acc1": 0.5}]})
    axes = panels(figure)["zeroshot/acc1"]
    figure.canvas.draw()
    ticks = [tick for tick in axes.get_xticks() if axes.get_xlim()[0] <= tick <= axes.get_xlim()[1]]
    assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
