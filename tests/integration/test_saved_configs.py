"""A saved config is data, not code: a checkpoint's or export's config whose model names something other
than vlmtrain's own classes (a project callable that runs a `pipe:` command, a standard-library function
that writes a file, a `_target_` nested in a tower's settings, `_partial_`) builds nothing and is refused
in one line by vlmtrain-eval, vlmtrain-export, load_pretrained and a resume; a saved `pipe:` eval source
is left out, in one line. The checkpoint folder is the boundary: a `latest` pointer out of it, a text
file, a FIFO or a link to /dev/zero is not a checkpoint; the newest intact step is used and nothing
outside `checkpoints/` is renamed. One tiny run is trained per module; each case rewrites a copy."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import SMALL_MODEL, CliResult, compose_train, data_overrides, run_cli, run_training
from vlmtrain import cli
from vlmtrain.checkpoint.load import CONFIG_FILE, load_pretrained

pytestmark = pytest.mark.slow
STEP = "step_00000002.pt"


def train_args(run_dir: Path, root: Path) -> list[str]:
    return [
        *data_overrides(root),
        *SMALL_MODEL,
        f"run_dir={run_dir}",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.val_shards=null",
        "trainer.max_steps=2",
        "trainer.checkpoint_every=1",
    ]


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory) -> Path:
    """A finished 2-step run (checkpoints of steps 1 and 2), trained once per module."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_training(compose_train(train_args(run_dir, synthetic_root)))
    return run_dir


def one_line_error(result: CliResult, needle: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr[-3000:]


# ---- payloads: (name, how the saved model config is rewritten) ----


def _project_callable(model: dict, marker: Path) -> None:
    model["image_encoder"] = {"_target_": "vlmtrain.data.urls.open_shard", "_args_": [f"pipe:touch {marker}"]}


def _stdlib_callable(model: dict, marker: Path) -> None:
    model["image_encoder"] = {"_target_": "shutil.copyfile", "src": os.devnull, "dst": str(marker)}


def _nested_target(model: dict, marker: Path) -> None:
    model["image_encoder"]["vision_cfg"]["layers"] = {
        "_target_": "shutil.copyfile",
        "src": os.devnull,
        "dst": str(marker),
    }


def _partial(model: dict, marker: Path) -> None:
    model["image_encoder"]["_partial_"] = True


def _wrong_type(model: dict, marker: Path) -> None:
    model["embed_dim"] = f"pipe:touch {marker}"


PAYLOADS = {
    "project_callable": (_project_callable, "vlmtrain.data.urls.open_shard"),
    "stdlib_callable": (_stdlib_callable, "shutil.copyfile"),
    "nested_target": (_nested_target, "_target_"),
    "partial": (_partial, "_partial_"),
    "wrong_type": (_wrong_type, "embed_dim"),
}


def crafted_run(trained: Path, folder: Path, rewrite) -> Path:
    """A copy of the trained run whose every checkpoint's saved config is rewritten by `rewrite(config)`."""
    run_dir = folder / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    saved = torch.load(trained / "checkpoints" / STEP, weights_only=True)
    rewrite(saved["config"])
    torch.save(saved, run_dir / "checkpoints" / STEP)
    (run_dir / "checkpoints" / "latest").write_text(STEP)
    return run_dir


@pytest.fixture(params=sorted(PAYLOADS))
def payload(request, trained, tmp_path) -> tuple[Path, Path, str]:
    """(crafted run dir, marker that must never appear, words the refusal names)."""
    rewrite, needle = PAYLOADS[request.param]
    marker = tmp_path / "marker"
    run_dir = crafted_run(trained, tmp_path, lambda config: rewrite(config["model"], marker))
    return run_dir, marker, needle


def test_eval_refuses_a_saved_config_that_is_not_vlmtrain_classes(payload, capsys):
    run_dir, marker, needle = payload
    result = run_cli(cli.evaluate, [f"checkpoint={run_dir}"], capsys)
    assert not marker.exists()
    one_line_error(result, needle)


def test_export_refuses_a_saved_config_that_is_not_vlmtrain_classes(payload, capsys, tmp_path):
    run_dir, marker, needle = payload
    result = run_cli(cli.export, [str(run_dir / "checkpoints" / STEP), "--out", str(tmp_path / "x")], capsys)
    assert not marker.exists() and not (tmp_path / "x").exists()
    one_line_error(result, needle)


def test_load_pretrained_refuses_a_saved_config_that_is_not_vlmtrain_classes(payload):

    run_dir, marker, needle = payload
    for source in (run_dir, run_dir / "checkpoints" / STEP):
        with pytest.raises(Exception) as error:
            load_pretrained(source)
        assert not marker.exists()
        assert (
            error.type.__name__ == "UntrustedConfig"
            and needle in str(error.value)
            and "\n" not in str(error.value)
        )


def test_resume_builds_nothing_from_a_saved_config(payload, synthetic_root, capsys):
    run_dir, marker, _ = payload
    result = run_cli(cli.train, train_args(run_dir, synthetic_root), capsys)
    assert not marker.exists()
    one_line_error(result, "cannot change when resuming")


@pytest.fixture(scope="module")
def export_folder(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "export"
    from vlmtrain.checkpoint.export import export

    export(trained, out, "vlmtrain")
    return out


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_an_export_folder_whose_config_is_not_vlmtrain_classes_is_refused(
    name, export_folder, tmp_path, capsys
):

    rewrite, needle = PAYLOADS[name]
    folder, marker = tmp_path / "export", tmp_path / "marker"
    shutil.copytree(export_folder, folder)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    rewrite(meta["model"], marker)
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(Exception) as error:
        load_pretrained(folder)
    assert not marker.exists()
    assert error.type.__name__ == "UntrustedConfig" and needle in str(error.value)
    result = run_cli(cli.export, [str(folder), "--out", str(tmp_path / "x")], capsys)
    assert not marker.exists()
    one_line_error(result, needle)


def test_a_saved_pipe_eval_source_is_left_out_in_one_line(trained, synthetic_root, tmp_path, capsys):
    marker = tmp_path / "marker"
    shard = next((synthetic_root / "val").glob("*.tar"))

    def rewrite(config: dict) -> None:
        config["data"]["val_shards"] = f"pipe:touch {marker}; cat {shard}"

    run_dir = crafted_run(trained, tmp_path, rewrite)
    result = run_cli(cli.evaluate, [f"checkpoint={run_dir}", f"out={tmp_path / 'eval.json'}"], capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if "left out" in line]
    assert len(notes) == 1 and "data.val_shards" in notes[0], result.stderr
    assert not marker.exists()
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert "zeroshot/acc1" in metrics and not any(key.startswith("retrieval") for key in metrics)
    # given on the command line, it is the user's own choice and is read
    given = run_cli(
        cli.evaluate,
        [
            f"checkpoint={run_dir}",
            f"val_shards='pipe:touch {marker}; cat {shard}'",
            f"out={tmp_path / 'eval2.json'}",
        ],
        capsys,
    )
    assert given.returncode == 0 and marker.exists(), given.stderr[-3000:]


def test_a_saved_pipe_eval_source_is_not_run_by_a_resume(trained, synthetic_root, tmp_path, capsys):
    marker = tmp_path / "marker"

    def rewrite(config: dict) -> None:
        config["data"]["val_shards"] = f"pipe:touch {marker}"

    run_dir = crafted_run(trained, tmp_path, rewrite)
    args = [*train_args(run_dir, synthetic_root), "trainer.max_steps=3", "data.zeroshot_dir=null"]
    result = run_cli(cli.train, args, capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists()


# ---- the checkpoint folder is the boundary ----


def junk_run(trained: Path, folder: Path, junk: str) -> tuple[Path, Path]:
    """A copy of the trained run whose newest entry is junk; returns (run dir, a file outside it)."""
    run_dir, outside = folder / "run", folder / "outside" / "precious.zip"
    outside.parent.mkdir()
    outside.write_bytes(b"not yours to rename")
    checkpoints = run_dir / "checkpoints"
    shutil.copytree(trained / "checkpoints", checkpoints, copy_function=os.link)  # never written to
    newest = checkpoints / "step_00000003.pt"
    (checkpoints / "latest").unlink()  # a link to the trained run's own pointer
    if junk == "text":
        newest.write_text("hello\n")
    elif junk == "fifo":
        os.mkfifo(newest)
    elif junk == "dev_zero":
        newest.symlink_to("/dev/zero")
    elif junk == "link_out":
        newest.symlink_to(outside)
    if junk in ("text", "fifo", "dev_zero", "link_out"):
        (checkpoints / "latest").write_text(newest.name)
    elif junk == "relative_out":
        (checkpoints / "latest").write_text(os.path.relpath(outside, checkpoints))
    elif junk == "absolute_out":
        (checkpoints / "latest").write_text(str(outside))
    return run_dir, outside


JUNK = ("text", "fifo", "dev_zero", "link_out", "relative_out", "absolute_out")


def with_deadline(call, fifo: Path, seconds: float = 120):
    """`call()` in a thread; a read blocked on `fifo` past the deadline is released and the test fails."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", call()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo.exists():
            os.close(os.open(fifo, os.O_WRONLY))  # pairs with the blocked reader, which sees an end of file
        thread.join(30)
        pytest.fail(f"blocked on {fifo} for {seconds} s")
    return result.get("value")


@pytest.mark.parametrize("junk", JUNK)
def test_export_and_load_use_the_newest_intact_step_past_junk(junk, trained, tmp_path, capsys):
    run_dir, outside = junk_run(trained, tmp_path, junk)
    fifo = run_dir / "checkpoints" / "step_00000003.pt"
    out = tmp_path / "x"
    result = with_deadline(lambda: run_cli(cli.export, [str(run_dir), "--out", str(out)], capsys), fifo)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / CONFIG_FILE).read_text())["step"] == 2
    assert with_deadline(lambda: load_pretrained(run_dir), fifo) is not None
    assert outside.read_bytes() == b"not yours to rename" and list(outside.parent.iterdir()) == [outside]


@pytest.mark.parametrize("junk", ("text", "fifo", "relative_out"))
def test_eval_uses_the_newest_intact_step_past_junk(junk, trained, tmp_path, capsys):
    run_dir, outside = junk_run(trained, tmp_path, junk)
    fifo = run_dir / "checkpoints" / "step_00000003.pt"
    out = tmp_path / "eval.json"
    args = [f"checkpoint={run_dir}", f"out={out}"]
    result = with_deadline(lambda: run_cli(cli.evaluate, args, capsys), fifo)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text())["checkpoint"].endswith(STEP)
    assert outside.read_bytes() == b"not yours to rename" and list(outside.parent.iterdir()) == [outside]


@pytest.mark.parametrize(
    "junk", ("text", "fifo", "dev_zero", "relative_out")
)  # all kinds: test_checkpoint_boundary
def test_resume_uses_the_newest_intact_step_past_junk(junk, trained, synthetic_root, tmp_path, capsys):
    run_dir, outside = junk_run(trained, tmp_path, junk)
    fifo = run_dir / "checkpoints" / "step_00000003.pt"
    args = [*train_args(run_dir, synthetic_root), "trainer.max_steps=3", "data.zeroshot_dir=null"]
    result = with_deadline(lambda: run_cli(cli.train, args, capsys), fifo)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / STEP}" in result.stdout + result.stderr
    assert outside.read_bytes() == b"not yours to rename" and list(outside.parent.iterdir()) == [outside]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003.pt"
