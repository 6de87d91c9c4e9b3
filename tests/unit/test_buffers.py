"""Reused batch buffers: a worker stacks into a free buffer and never into one in use, and a loader that
reuses them yields the very batches of one that does not."""

import itertools

import pytest
import torch

from tests.helpers.shards import keyed_shards
from vlmtrain.data.buffers import BatchBuffers
from vlmtrain.data.loader import TrainLoader
from vlmtrain.data.transforms import image_transform
from vlmtrain.schema import DataConfig


def _images(value: int, count: int = 4) -> list[torch.Tensor]:
    return [torch.full((3, 5, 5), value + n, dtype=torch.uint8) for n in range(count)]


def test_a_buffer_in_use_is_never_written_and_a_released_one_is_reused():
    buffers = BatchBuffers(workers=2, count=3)
    held = [buffers.stack(1, _images(10 * n)) for n in range(3)]
    assert [index for _, index in held] == [0, 1, 2]
    assert held[0][0].is_contiguous(memory_format=torch.channels_last)  # rows copied, not transposed
    stacked, index = buffers.stack(1, _images(90))  # none free: fresh memory, the three left alone
    assert index == -1 and stacked[0, 0, 0, 0] == 90
    assert [int(batch[0, 0, 0, 0]) for batch, _ in held] == [0, 10, 20]
    buffers.release(1, 1)
    again, index = buffers.stack(1, _images(50))
    assert (
        index == 1
        and again.data_ptr() == held[1][0].data_ptr()
        and torch.equal(again, torch.stack(_images(50)))
    )
    assert buffers.flags[0].tolist() == [1, 1, 1]  # worker 0's buffers are its own
    smaller, index = buffers.stack(0, _images(7, count=2))  # another shape: the buffer is made again
    assert index >= 0 and torch.equal(smaller, torch.stack(_images(7, count=2)))


@pytest.mark.slow
def test_reused_buffers_yield_the_same_batches(tmp_path):
    keyed_shards(tmp_path, [40, 40, 40, 40])
    config = DataConfig(train_shards=str(tmp_path), batch_size=8, num_workers=2, shuffle_buffer=10)
    transform = image_transform(8, (0.5,) * 3, (0.5,) * 3, (0.4, 1.0), normalize=False)

    def batches(reuse: bool) -> tuple[list[tuple[list[str], torch.Tensor]], int]:
        """Each batch's keys and images as they arrived, and how many of the batches held since have
        been written over (their buffers used again)."""
        loader = TrainLoader(config, transform, lambda t: torch.zeros(len(t), 1), 3, reuse_buffers=reuse)
        held = [(b.keys, b.images.clone(), b.images) for b in itertools.islice(loader, 30)]
        loader.close()
        overwritten = sum(not torch.equal(copy, images) for _, copy, images in held)
        return [(keys, copy) for keys, copy, _ in held], overwritten

    (plain, untouched), (reused, overwritten) = batches(False), batches(True)
    assert [keys for keys, _ in plain] == [keys for keys, _ in reused]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(plain, reused))
    assert untouched == 0 and overwritten > 0  # the workers did fill the released buffers again
