import json

from vlmtrain.train.metrics import MetricLogger, Throughput, progress_line, wandb_mode


def test_wandb_is_offline_without_a_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_metrics_jsonl_rows_and_progress_line(tmp_path):
    logger = MetricLogger(tmp_path, enabled=True, use_wandb=False, config={}, project="p")
    speed = Throughput(start_step=0, max_steps=100)
    speed.add(640, data_seconds=0.0)
    row = {"loss": 2.5, "lr": 1e-3, **speed.report(10)}
    logger.log(10, row)
    logged = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert logged["step"] == 10 and logged["loss"] == 2.5 and logged["samples_per_s"] > 0
    line = progress_line(10, 100, row)
    assert line.startswith("step 10/100 loss 2.5000") and "samples/s data 0% eta" in line
    assert 0 <= logged["data_wait"] <= 1


def test_data_wait_is_the_share_of_the_window_spent_waiting():
    speed = Throughput(start_step=0, max_steps=10)
    speed.last_time -= 2.0  # a 2 s window
    speed.add(8, data_seconds=0.5)
    assert 0.2 < speed.report(1)["data_wait"] <= 0.25
