import json

from vlmtrain.report.runs import find_runs, runs_table, to_markdown


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


def test_a_sweep_point_and_a_single_run_write_booleans_alike(tmp_path):
    """Hydra records a sweep's points with Python's False; the same value typed `false` is no difference."""
    fake_run(tmp_path / "sweep" / "0", "finished", ["trainer.wandb=False", "seed=0"])
    fake_run(tmp_path / "single", "finished", ["trainer.wandb=false", "seed=1"])
    table = runs_table(tmp_path)
    assert "trainer.wandb" not in table[0] and [row["seed"] for row in table] == ["1", "0"]


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


def test_a_damaged_run_is_a_row_and_the_others_still_show(tmp_path, capsys):
    from vlmtrain.commands.runs import runs

    fake_run(tmp_path / "a", "finished", ["optim.lr=1e-3"], loss=1.5)
    fake_run(tmp_path / "b", "finished", ["optim.lr=2e-3"])
    fake_run(tmp_path / "c", "finished", ["optim.lr=3e-3"])
    fake_run(tmp_path / "d", "finished", ["optim.lr=4e-3"])
    (tmp_path / "b" / ".hydra" / "overrides.yaml").write_text("- [unclosed\n")
    (tmp_path / "c" / "config.json").write_text('{"model": {"embed_dim": 6')  # cut short
    marker = tmp_path / "marker"
    payload = {"model": {"_target_": "shutil.copyfile", "src": "/dev/null", "dst": str(marker)}}
    (tmp_path / "a" / "config.json").write_text(json.dumps(payload))  # read as values, never built
    (tmp_path / "d" / ".hydra" / "overrides.yaml").write_text(
        f"!!python/object/apply:os.system ['touch {marker}']\n"
    )
    table = runs_table(tmp_path)
    assert [(row["name"], row["state"]) for row in table] == [
        ("a", "finished"),
        ("b", "damaged"),
        ("c", "damaged"),
        ("d", "damaged"),
    ]
    assert table[1]["error"].startswith("overrides.yaml: ") and table[2]["error"].startswith("config.json: ")
    assert not marker.exists()
    runs([str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and "| a | finished |" in lines[2] and "| b | damaged |" in lines[3]
