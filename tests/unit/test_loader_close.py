"""A loader that stops leaves nothing in the temporary directory: its workers hand batches over in shared
memory through multiprocessing's file-descriptor server, whose folder (pymp-*) only a process that exits
normally removes, and the loader kills its workers."""

import multiprocessing
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers.shards import keyed_shards
from vlmtrain.data.loader import TrainLoader
from vlmtrain.data.transforms import image_transform
from vlmtrain.schema import DataConfig


@pytest.fixture
def temporary(monkeypatch):
    """The temporary directory of this process and the processes it forks, as in a new process."""
    folder = Path(tempfile.mkdtemp())  # a short path: a socket's is at most 108 bytes; pytest's are deep
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    # a process that has made multiprocessing's folder already hands that one to its children
    monkeypatch.delitem(multiprocessing.current_process()._config, "tempdir", raising=False)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.parametrize("reuse_buffers", [False, True])
def test_a_closed_loader_leaves_no_folder_of_its_workers_behind(tmp_path, temporary, reuse_buffers):
    keyed_shards(tmp_path, [20, 20])
    config = DataConfig(train_shards=str(tmp_path), batch_size=4, num_workers=2)
    transform = image_transform(8, (0.5,) * 3, (0.5,) * 3, normalize=False)
    loader = TrainLoader(
        config, transform, lambda texts: torch.zeros(len(texts), 1), 0, reuse_buffers=reuse_buffers
    )
    batches = iter(loader)  # held: a dropped iterator would close the loader itself
    assert len([next(batches) for _ in range(6)]) == 6
    assert list(temporary.glob("pymp-*/listener-*"))  # the workers' servers, through which batches came
    loader.close()
    assert list(temporary.glob("pymp-*")) == []  # the workers' folders, or the loader's for them
