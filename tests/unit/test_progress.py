import io
import logging
import sys

from vlmtrain.train.progress import Progress

FIGURES = {"loss": 1.25, "lr": 1e-3, "samples_per_s": 320.0, "data_wait": 0.1, "eta_s": 5}


def test_terminal_gets_a_live_bar_with_the_run_figures():
    stream = io.StringIO()
    progress = Progress(start=2, total=10, bar=True, stream=stream)
    for step in range(3, 8):
        progress.advance()
        progress.report(step, FIGURES)
    progress.close()
    last = stream.getvalue().split("\r")[-1]
    assert "7/10" in last and "loss 1.2500" in last and "320 samples/s" in last and "data 10%" in last


def test_without_a_terminal_each_report_is_a_log_line(caplog):
    stream = io.StringIO()  # not a TTY: no bar
    progress = Progress(start=0, total=10, stream=stream)
    with caplog.at_level(logging.INFO, logger="vlmtrain"):
        progress.advance()
        progress.report(1, FIGURES)
    progress.close()
    assert stream.getvalue() == ""
    assert [r.getMessage() for r in caplog.records][0].startswith("step 1/10 loss 1.2500")


def test_log_records_print_once_while_the_bar_is_shown(capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # a console handler, as Hydra installs
    root.addHandler(handler)
    try:
        progress = Progress(start=0, total=4, bar=True, stream=io.StringIO())
        logging.getLogger("vlmtrain").warning("eval at step 2")
        progress.close()
    finally:
        root.removeHandler(handler)
    assert capsys.readouterr().err.count("eval at step 2") == 1


def test_with_a_bar_the_progress_lines_still_reach_log_files(tmp_path, capsys):
    root = logging.getLogger()
    console, file = logging.StreamHandler(sys.stderr), logging.FileHandler(tmp_path / "run.log")
    for handler in (console, file):
        root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)  # not `root.level =`: that leaves the loggers' cached answers stale
    try:
        progress = Progress(start=0, total=4, bar=True, stream=io.StringIO())
        progress.report(1, FIGURES)
        progress.close()
    finally:
        root.setLevel(old_level)
        for handler in (console, file):
            root.removeHandler(handler)
        file.close()
    assert "step 1/4 loss 1.2500" in (tmp_path / "run.log").read_text()
    assert "step 1/4" not in capsys.readouterr().err  # the bar shows it on the console
    assert console.filters == []
