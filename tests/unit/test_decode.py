"""The training transform's JPEG path (decode_jpeg + torch's resize) against PIL's bicubic path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision import transforms as T

from vlmtrain.data.transforms import (
    TrainTransform,
    _undecoded_jpeg,
    decode_image,
    image_transform,
    jpeg_header,
    transformed_image,
)

SIZE = 224
MIN_PSNR = 45.0  # decode_jpeg path: 71-74 dB, draft path: 47-55 dB; nearest or a crop 1 px off: < 35


def _encode(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """china.jpg and flower.jpg, and crops of them resized to 480x360-640x480 and recompressed."""
    datasets = pytest.importorskip("sklearn.datasets")
    sources = [Image.fromarray(array) for array in datasets.load_sample_images().images]
    variants = [((480, 360), (0, 0, 560, 420), 75), ((640, 480), (40, 20, 600, 440), 92)]
    variants.append(((384, 512), (100, 0, 420, 427), 85))  # portrait
    photos = []
    for source in sources:
        photos.append(_encode(source, quality=90))
        for size, box, quality in variants:
            photos.append(_encode(source.crop(box).resize(size, Image.BICUBIC), quality=quality))
    return photos


def _pil_reference(data: bytes, random_crop_scale: tuple[float, float] | None = None) -> torch.Tensor:
    """What the training transform gave before: full PIL decode, bicubic resize, crop."""
    transform = image_transform(SIZE, (0.0,) * 3, (1.0,) * 3, random_crop_scale, normalize=False)
    with Image.open(io.BytesIO(data)) as image:
        return transform(image.convert("RGB"))


def _psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (image.float() - reference.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def _full_decode(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def test_jpegs_take_the_decode_jpeg_path_and_others_do_not(photos: list[bytes]) -> None:
    assert _undecoded_jpeg(decode_image({"jpg": photos[0]})) is not None
    png = _encode(Image.open(io.BytesIO(photos[0])), "PNG")
    assert _undecoded_jpeg(decode_image({"png": png})) is None
    loaded = decode_image({"jpg": photos[0]})
    loaded.load()  # once PIL has the pixels, they may have been changed: PIL's path takes it
    assert _undecoded_jpeg(loaded) is None


def test_center_crop_matches_pil_bicubic_and_wrong_resamplers_fail_the_threshold(
    photos: list[bytes],
) -> None:
    fast = TrainTransform(SIZE)
    bicubic, nearest = T.InterpolationMode.BICUBIC, T.InterpolationMode.NEAREST
    scores = []
    for data in photos:
        reference = _pil_reference(data)
        out = fast(decode_image({"jpg": data}))
        assert out.dtype == torch.uint8 and out.shape == (3, SIZE, SIZE)
        assert (out.int() - reference.int()).abs().max() <= 2
        scores.append(_psnr(out, reference))
        # the same threshold fails a nearest-neighbour resize and a crop one pixel off the center
        pixels = _full_decode(data)
        nearest_neighbour = F.center_crop(F.resize(pixels, SIZE, interpolation=nearest), SIZE)
        assert _psnr(nearest_neighbour, reference) < MIN_PSNR
        resized = F.resize(pixels, SIZE, interpolation=bicubic, antialias=True)
        height, width = resized.shape[-2:]
        top, left = round((height - SIZE) / 2), round((width - SIZE) / 2)
        shifted = F.crop(resized, top + (height > SIZE), left + (width > SIZE), SIZE, SIZE)
        assert _psnr(shifted, reference) < MIN_PSNR
    assert min(scores) >= MIN_PSNR, scores


def test_random_resized_crop_is_drawn_from_torch_and_matches_pil(photos: list[bytes]) -> None:
    scale = (0.3, 1.0)
    fast = TrainTransform(SIZE, scale)
    for seed, data in enumerate(photos):
        torch.manual_seed(seed)
        out = fast(decode_image({"jpg": data}))
        torch.manual_seed(seed)
        assert torch.equal(fast(decode_image({"jpg": data})), out)  # reproducible
        torch.manual_seed(seed)
        reference = _pil_reference(data, scale)  # T.RandomResizedCrop under the same seed
        assert out.dtype == torch.uint8 and out.shape == (3, SIZE, SIZE)
        assert _psnr(out, reference) >= MIN_PSNR
    torch.manual_seed(1)
    assert not torch.equal(fast(decode_image({"jpg": photos[0]})), out)


@pytest.mark.parametrize("scale", [None, (0.5, 1.0)])
def test_big_jpegs_are_decoded_reduced_and_match_pil(scale: tuple[float, float] | None) -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    size = 96  # 1280 px is more than 4x twice the target, also for the smallest crop (0.5 of the area)
    for seed, array in enumerate(datasets.load_sample_images().images):
        for width, height in ((1920, 1280), (1280, 1920)):
            data = _encode(Image.fromarray(array).resize((width, height), Image.BICUBIC), quality=90)
            image = decode_image({"jpg": data})
            torch.manual_seed(seed)
            out = TrainTransform(size, scale)(image)
            assert image.size == (width // 4, height // 4)  # decoded at a quarter of its size
            torch.manual_seed(seed)
            transform = image_transform(size, (0.0,) * 3, (1.0,) * 3, scale, normalize=False)
            reference = transform(Image.open(io.BytesIO(data)).convert("RGB"))
            assert out.dtype == torch.uint8 and out.shape == (3, size, size)
            assert _psnr(out, reference) >= MIN_PSNR


@pytest.mark.parametrize(
    "ext,mode,options",
    [
        ("jpg", "L", {"format": "JPEG"}),
        ("jpg", "CMYK", {"format": "JPEG"}),
        ("png", "RGB", {"format": "PNG"}),
        ("png", "RGBA", {"format": "PNG"}),
        ("png", "P", {"format": "PNG"}),
        ("webp", "RGB", {"format": "WEBP", "quality": 90}),
    ],
)
def test_other_images_go_through_pil(
    photos: list[bytes], ext: str, mode: str, options: dict[str, object]
) -> None:
    with Image.open(io.BytesIO(photos[1])) as image:
        data = _encode(image.convert(mode), options.pop("format"), **options)
    for scale in (None, (0.5, 1.0)):
        torch.manual_seed(0)
        out = TrainTransform(SIZE, scale)(decode_image({ext: data}))
        torch.manual_seed(0)
        assert torch.equal(out, _pil_reference(data, scale))
        assert out.dtype == torch.uint8 and out.shape == (3, SIZE, SIZE)


def test_a_corrupt_jpeg_raises(photos: list[bytes]) -> None:
    """The stream skips and counts a sample whose transform raises."""
    transform = TrainTransform(SIZE)
    with pytest.raises(OSError):
        transform(decode_image({"jpg": photos[2][: len(photos[2]) // 2]}))
    with pytest.raises(OSError):
        transform(decode_image({"jpg": b"\xff\xd8\xff" + bytes(200)}))


def test_the_eval_transform_reads_decode_images_result_as_before(photos: list[bytes]) -> None:
    transform = image_transform(SIZE, (0.5,) * 3, (0.5,) * 3)
    with Image.open(io.BytesIO(photos[3])) as image:
        expected = transform(image.convert("RGB"))
    assert torch.equal(transform(decode_image({"jpg": photos[3]})), expected)


def _variants(photos: list[bytes]) -> list[bytes]:
    """The photos, and JPEGs PIL writes otherwise: progressive, optimised, grey, CMYK, with EXIF and an
    ICC profile before the frame header."""
    with Image.open(io.BytesIO(photos[1])) as image:
        rgb = image.convert("RGB")
    exif = Image.Exif()
    exif[0x010E] = "a description" * 20
    return [
        *photos,
        _encode(rgb, progressive=True, quality=80),
        _encode(rgb, optimize=True),
        _encode(rgb.convert("L")),
        _encode(rgb.convert("CMYK")),
        _encode(rgb, exif=exif.tobytes(), icc_profile=b"\0" * 3000),
    ]


def test_the_jpeg_header_reads_as_pil_reads_it(photos: list[bytes]) -> None:
    for data in _variants(photos):
        with Image.open(io.BytesIO(data)) as image:
            assert jpeg_header(data) == (*image.size, image.layers)
    png = _encode(Image.open(io.BytesIO(photos[0])), "PNG")
    for other in (png, b"", b"\xff\xd8", b"\xff\xd8\xff\xe0\x00\x10" + bytes(10), photos[0][:100] + bytes(8)):
        assert jpeg_header(other) is None


def test_a_jpegs_bytes_give_what_its_pil_image_gives(photos: list[bytes]) -> None:
    """The stream hands a TrainTransform the sample's bytes (transformed_image): the same pixels and
    crops as through decode_image, for every kind of JPEG, and the same error for a corrupt one."""
    for scale in (None, (0.5, 1.0)):
        transform = TrainTransform(SIZE, scale)
        for data in _variants(photos):
            torch.manual_seed(3)
            direct = transformed_image(transform, {"jpg": data})
            torch.manual_seed(3)
            assert torch.equal(direct, transform(decode_image({"jpg": data})))
    for corrupt in (photos[2][: len(photos[2]) // 2], b"\xff\xd8\xff" + bytes(200)):
        with pytest.raises(OSError):
            transformed_image(TrainTransform(SIZE), {"jpg": corrupt})
