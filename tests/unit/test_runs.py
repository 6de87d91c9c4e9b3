import json

from vlmtrain.train.runs import find_runs, runs_table, to_markdown


def fake_run(folder, state, overrides, loss=None):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    status = {"state": state, "step": 5, "max_steps": 10, "host": "elsewhere", "pid": 1}
    (folder / "status.json").write_text(json.dumps(status))
    if loss is not None:
        (folder / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": loss}) + "\n")


def test_runs_started_from_the_command_line_differ_by_their_overrides(tmp_path):
    fake_run(tmp_path / "sweep" / "10", "running", ["loss=siglip", "optim.lr=1e-3", "seed=0"])
    fake_run(tmp_path / "sweep" / "2", "finished", ["loss=clip", "optim.lr=2e-3", "seed=0"], loss=1.5)
    (tmp_path / "sweep" / "multirun.yaml").write_text("{}")
    assert [p.name for p in find_runs(tmp_path)] == ["2", "10"]
    table = runs_table(tmp_path)
    assert [row["name"] for row in table] == ["sweep/2", "sweep/10"]
    assert table[0]["loss"] == 1.5 and table[0]["loss (config)"] == "clip"  # a group choice keeps apart
    assert table[1]["state"] == "running"  # another host's run is taken at its word
    assert [row["optim.lr"] for row in table] == ["2e-3", "1e-3"] and "seed" not in table[0]
    lines = to_markdown(table).splitlines()
    assert lines[0].startswith("| name | state | step | loss |") and "| 5/10 |" in lines[2]


def test_a_submitted_run_shows_its_job(tmp_path, capsys):
    from vlmtrain.commands.runs import runs

    fake_run(tmp_path / "a", "running", ["optim.lr=1e-3"])
    fake_run(tmp_path / "b", "finished", ["optim.lr=2e-3"])
    (tmp_path / "a" / "slurm_jobs.jsonl").write_text(json.dumps({"job_id": "999999991"}) + "\n")
    runs([str(tmp_path), "--csv"])
    rows = capsys.readouterr().out.splitlines()
    assert "job" in rows[0].split(",") and "slurm_state" in rows[0].split(",")
    assert "999999991" in rows[1] and "unknown" in rows[1]  # SLURM has never heard of it


def test_a_running_run_shows_its_time_left(tmp_path):
    fake_run(tmp_path / "going", "running", ["seed=0"])
    fake_run(tmp_path / "done", "finished", ["seed=1"])
    for name, eta_s in (("going", 3725.4), ("done", 0.0)):  # a finished run's last eta is 0
        (tmp_path / name / "metrics.jsonl").write_text(
            json.dumps({"step": 5, "loss": 2.0, "eta_s": eta_s}) + "\n"
        )
    table = {row["name"]: row for row in runs_table(tmp_path)}
    assert table["going"]["eta"] == "1:02:05" and table["done"]["eta"] is None
    assert "| eta |" in to_markdown(list(table.values())).splitlines()[0]
