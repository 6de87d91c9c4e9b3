"""Garbage collection at step boundaries: off between them, cyclic garbage collected at the steps set,
Python's own collection back afterwards, and data workers that collect on their own."""

import gc
import itertools
import weakref

import torch

from tests.helpers.shards import keyed_shards
from vlmtrain.data.loader import TrainLoader
from vlmtrain.schema import DataConfig
from vlmtrain.train.garbage_collection import StepCollector


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def test_collection_runs_at_the_steps_set_and_only_there():
    before = gc.isenabled()
    with StepCollector(every=3) as collector:
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        garbage = weakref.ref(Node())
        for step in (1, 2):
            collector.step(step)
            assert garbage() is not None  # no collection between the steps set
        collector.step(3)
        assert garbage() is None
    assert gc.isenabled() == before and gc.get_freeze_count() == 0


def test_every_zero_leaves_python_to_collect():
    with StepCollector(every=0) as collector:
        assert gc.isenabled() and gc.get_freeze_count() == 0
        collector.step(5)


def _worker_collects(image: object) -> torch.Tensor:
    return torch.full((3, 2, 2), int(gc.isenabled()), dtype=torch.uint8)


def test_data_workers_collect_on_their_own(tmp_path):
    keyed_shards(tmp_path, [6, 6])
    config = DataConfig(train_shards=str(tmp_path), batch_size=2, num_workers=2, shuffle_buffer=2)
    with StepCollector(every=50):  # the workers are forked with the collector off
        loader = TrainLoader(config, _worker_collects, lambda t: torch.zeros(len(t), 1), seed=0)
        batches = [b.images.clone() for b in itertools.islice(loader, 4)]
        loader.close()
    assert all(bool(images.all()) for images in batches)
