"""`vlmtrain-train` resuming a run whose newest step folder holds a crafted metadata pickle, under
`trainer.parallel=fsdp` and under ddp (which reads a sharded run's folder whole): one line on stderr,
nothing in it run, and the process group made to shard a single process let go (the real entry point,
in process)."""

from __future__ import annotations

import pickle

import pytest
import torch

from tests.helpers.runs import SMALL_MODEL, data_overrides, run_cli
from tests.integration.test_sharded_checkpoint import _Payload
from vlmtrain import cli


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_train_resume_refuses_a_crafted_metadata_file_in_one_line(synthetic_root, tmp_path, capsys, parallel):
    """Slow: the command composes its config and builds the model (seconds) before it reads a checkpoint."""
    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    folder = run_dir / "checkpoints" / "step_00000002"
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (folder.parent / "latest").write_text(folder.name)
    argv = [*data_overrides(synthetic_root), *SMALL_MODEL, f"run_dir={run_dir}"]
    argv += [f"trainer.parallel={parallel}", "data.batch_size=8", "data.num_workers=0"]
    result = run_cli(cli.train, argv, capsys)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == (
        f"error: {folder / '.metadata'}: refused: its metadata would build io.open, not only checkpoint "
        "metadata, and loading it could run code"
    )
    assert not marker.exists()
    assert not torch.distributed.is_initialized()
