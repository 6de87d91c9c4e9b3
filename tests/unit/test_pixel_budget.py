"""`data.max_image_pixels`: an image with more pixels, small on disk, is refused from its header before
anything decodes it, skipped and counted as a bad `image`, in the data workers too."""

from __future__ import annotations

import io
import itertools
import warnings

import pytest
import torch
from PIL import Image, ImageFile

from tests.helpers.shards import png_bytes, write_tar
from vlmtrain.data import transforms
from vlmtrain.data.loader import TrainLoader
from vlmtrain.data.stream import ShardStream
from vlmtrain.data.transforms import ImageTooLarge, TrainTransform, decode_image, limit_image_pixels
from vlmtrain.schema import DataConfig

BUDGET = 1_000_000
BIG = (6000, 6000)  # 36 MP: 108 MB decoded as RGB, a few tens of KB on disk


def encoded(size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, 90).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def big_png() -> bytes:
    return encoded(BIG, "PNG")


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return encoded(BIG, "JPEG")


@pytest.fixture
def budget(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    limit_image_pixels(BUDGET)


def no_tokens(texts: list[str]) -> torch.Tensor:
    return torch.zeros(len(texts), 1, dtype=torch.long)


def test_an_image_over_the_budget_is_skipped_and_counted_without_decoding(
    tmp_path, budget, big_png, big_jpeg, monkeypatch
):
    decoded: list[tuple[int, int]] = []  # sizes of the images that anything decoded
    pil_load, jpeg_decode = ImageFile.ImageFile.load, transforms.decode_jpeg

    def load(image):
        decoded.append(image.size)
        return pil_load(image)

    def decode_jpeg(data, **options):
        pixels = jpeg_decode(data, **options)
        decoded.append(tuple(pixels.shape[-1:-3:-1]))
        return pixels

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(transforms, "decode_jpeg", decode_jpeg)
    small_jpeg = encoded((64, 48), "JPEG")
    samples = [
        {"__key__": "small_png", "png": png_bytes(), "txt": b"a"},
        {"__key__": "big_png", "png": big_png, "txt": b"b"},
        {"__key__": "big_jpeg", "jpg": big_jpeg, "txt": b"c"},
        {"__key__": "small_jpeg", "jpg": small_jpeg, "txt": b"d"},
    ]
    shard = write_tar(tmp_path / "0.tar", samples)
    assert shard.stat().st_size < 1_000_000  # small on disk: 108 MB once decoded
    stream = ShardStream([[str(shard)]], TrainTransform(8), no_tokens, 1, shuffle_buffer=0)
    batches = list(itertools.islice(stream.slot_batches(0, 1), 2))
    assert [b["meta"].keys[0] for b in batches] == ["small_png", "small_jpeg"]
    assert batches[-1]["meta"].cursor.bad["image"] == 2
    assert decoded and all(w * h <= BUDGET for w, h in decoded), decoded  # the big ones never decoded


def test_pils_own_check_is_an_error_not_a_warning(budget):
    just_over = encoded((1100, 1000), "PNG")  # PIL only warns between its limit and twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        with pytest.raises(ImageTooLarge, match="max_image_pixels"):
            decode_image({"png": just_over})
        assert decode_image({"png": encoded((1000, 1000), "PNG")}).size == (1000, 1000)


def test_the_budget_reaches_the_data_workers(tmp_path, big_png):
    samples = [{"__key__": f"s{i}", "png": big_png if i == 1 else png_bytes(), "txt": b"x"} for i in range(6)]
    write_tar(tmp_path / "0.tar", samples)
    config = DataConfig(
        train_shards=str(tmp_path), batch_size=2, num_workers=1, shuffle_buffer=0, samples_per_epoch=6,
        max_image_pixels=BUDGET,
    )  # fmt: skip
    loader = TrainLoader(config, TrainTransform(8), no_tokens, seed=0)
    try:
        keys = [key for batch in itertools.islice(loader, 2) for key in batch.keys]
    finally:
        loader.close()
    assert "s1" not in keys and loader.bad_counts()["image"] == 1
