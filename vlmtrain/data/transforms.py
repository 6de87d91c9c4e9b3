"""Image preprocessing: decode bytes, resize, crop, normalise (open_clip's eval transform by default).

The training transform decodes JPEGs with libjpeg-turbo through `torchvision.io.decode_jpeg` and
resizes the uint8 tensor with torch's antialiased bicubic filter, which is PIL's filter: its output is
within two grey levels of the PIL transform's (tests/unit/test_decode.py) for 2.6x less CPU time
(BENCHMARKS.md, "JPEG decode"). Big JPEGs are decoded reduced by PIL (`draft`); other images, and
JPEGs that are not plain RGB, go through PIL. The eval transform stays PIL's, as open_clip's.

Training batches leave the data workers as uint8 and are normalised where the model runs
(`BatchNormalize`): a quarter of the bytes through worker IPC, pinning and the host-to-GPU copy, and
no per-sample float work in the workers. The arithmetic is ToTensor's and Normalize's, so the values
are the same bits as the float transform's.

A pixel budget (`data.max_image_pixels`, set in the data workers by `limit_image_pixels`) is checked from
an image's header before anything is decoded: a PNG of a few hundred KB can hold 13k x 13k pixels, which
decoded take gigabytes. A bigger image raises ImageTooLarge (a bad `image` sample). The budget is PIL's
own MAX_IMAGE_PIXELS, whose DecompressionBombWarning is an error here, never only a warning."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, JpegImagePlugin
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg  # deprecated in 0.29 for torchcodec; still there

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# decode_jpeg reads a sample's bytes in place (never writes them): torch's warning that they are read-only
# does not apply to the calls made here.
warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning, __name__)
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)  # a budget, not a remark


class ImageTooLarge(ValueError):
    """An image with more pixels than the budget, found from its header (nothing decoded)."""


def limit_image_pixels(pixels: int) -> None:
    """Refuse images of more than `pixels` pixels in this process, before decoding them."""
    Image.MAX_IMAGE_PIXELS = pixels


def check_pixels(width: int, height: int) -> None:
    """Raise ImageTooLarge if width x height exceeds the budget (`limit_image_pixels`)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ImageTooLarge(
            f"{width}x{height} pixels, more than data.max_image_pixels ({limit}); not decoded"
        )


def image_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    random_crop_scale: Sequence[float] | None = None,
    normalize: bool = True,
) -> T.Compose:
    """PIL image -> normalised float (3, size, size), or uint8 with `normalize=False` (`BatchNormalize`)."""
    if random_crop_scale:
        resize = [
            T.RandomResizedCrop(
                image_size, scale=tuple(random_crop_scale), interpolation=T.InterpolationMode.BICUBIC
            )
        ]
    else:
        resize = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    if not normalize:
        return T.Compose([*resize, T.PILToTensor()])
    return T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])


class TrainTransform:
    """decode_image's image -> uint8 (3, size, size): a random-resized crop (`random_crop_scale`) or
    a resize of the shorter side then a center crop, bicubic, as `image_transform(normalize=False)`.

    A JPEG that decode_image left undecoded goes through decode_jpeg and torch's resize; the crop is
    drawn from torch's global RNG exactly as T.RandomResizedCrop draws it, so a seed gives the same
    crop on either path. A JPEG big enough to be decoded reduced by 4 or 8 in the DCT domain with its
    smallest crop still twice the target is decoded so by PIL (`draft`). PIL takes every other image,
    and any JPEG that libjpeg-turbo refuses (PIL then decodes it or raises, so a corrupt file fails
    as it did before)."""

    ratio = (3 / 4, 4 / 3)  # T.RandomResizedCrop's default aspect ratios

    def __init__(self, image_size: int, random_crop_scale: Sequence[float] | None = None) -> None:
        self.size = image_size
        self.scale = tuple(random_crop_scale) if random_crop_scale else None
        self.pil = image_transform(image_size, (0.0,) * 3, (1.0,) * 3, random_crop_scale, normalize=False)
        # A JPEG is decoded reduced (`draft`) when that leaves the smallest crop twice the target and
        # divides its sides by 4 or 8; a reduction by 2 measured no faster than decode_jpeg.
        self.reduce_to = math.ceil(2 * image_size / math.sqrt(self.scale[0] if self.scale else 1.0))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        encoded = _undecoded_jpeg(image)
        if encoded is None:
            return self.pil(image)
        if min(image.size) >= 4 * self.reduce_to:
            return self._reduced(image)
        pixels = _decode_jpeg(encoded)
        return self.pil(image) if pixels is None else self._resize(pixels)

    def from_jpeg(self, data: bytes) -> torch.Tensor | None:
        """A plain JPEG's bytes (3 components, not big enough to decode reduced) straight through
        decode_jpeg, without PIL reading its header first; None for any other bytes. One that
        libjpeg-turbo refuses goes to PIL, which decodes it or raises, as in `__call__`."""
        header = jpeg_header(data)
        if header is not None:
            check_pixels(*header[:2])
        if header is None or header[2] != 3 or min(header[:2]) >= 4 * self.reduce_to:
            return None
        pixels = _decode_jpeg(memoryview(data))  # no copy
        return self.pil(decode_image({"jpg": data})) if pixels is None else self._resize(pixels)

    def _resize(self, pixels: torch.Tensor) -> torch.Tensor:
        bicubic = T.InterpolationMode.BICUBIC
        if self.scale:
            top, left, height, width = T.RandomResizedCrop.get_params(pixels, self.scale, self.ratio)
            size = [self.size, self.size]
            return F.resized_crop(pixels, top, left, height, width, size, bicubic, antialias=True)
        resized = F.resize(pixels, self.size, interpolation=bicubic, antialias=True)
        return F.center_crop(resized, self.size)  # a view: the batch's stacking copies it

    def _reduced(self, image: Image.Image) -> torch.Tensor:
        """A big photo: the crop is placed on the full image, then PIL decodes the image reduced in
        the DCT domain, cheaper than a full decode (BENCHMARKS.md), and resamples the crop's box."""
        full_width, full_height = image.size
        if self.scale:
            top, left, height, width = T.RandomResizedCrop.get_params(image, self.scale, self.ratio)
            box = (left, top, left + width, top + height)
        else:
            box = _center_crop_box(full_width, full_height, self.size)
        _, (_, _, width, height) = image.draft("RGB", (self.reduce_to, self.reduce_to))
        fx, fy = width / full_width, height / full_height  # where the full image lies in the reduced one
        box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        return T.functional.pil_to_tensor(image.resize((self.size,) * 2, Image.BICUBIC, box=box))


def _decode_jpeg(encoded: memoryview) -> torch.Tensor | None:
    """RGB pixels (3, H, W) by libjpeg-turbo; None for a file it refuses (PIL gets it then)."""
    try:
        return decode_jpeg(torch.frombuffer(encoded, dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's frame header; None if `data` is not a JPEG or its
    markers end first. What Image.open reads for these, in 1 us instead of its 14 us."""
    if not data.startswith(b"\xff\xd8"):
        return None
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:  # fill byte, markers without length
            at += 1 if marker == 0xFF else 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame (SOFn)
            frame = data[at + 5 : at + 10]
            if len(frame) < 5:
                return None
            return int.from_bytes(frame[2:4], "big"), int.from_bytes(frame[0:2], "big"), frame[4]
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return None


def transformed_image(transform: Callable, sample: dict) -> torch.Tensor:
    """The sample's image (as decode_image finds it) through `transform`; a TrainTransform takes a plain
    JPEG's bytes itself."""
    if isinstance(transform, TrainTransform):
        ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if ext in ("jpg", "jpeg") and (image := transform.from_jpeg(sample[ext])) is not None:
            return image
    return transform(decode_image(sample))


def _center_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The box of the full image that T.Resize(size) then T.CenterCrop(size) keep."""
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)  # T.Resize's rounding
    new_width, new_height = (size, new_long) if width <= height else (new_long, size)
    left, top = round((new_width - size) / 2), round((new_height - size) / 2)  # T.CenterCrop's
    sx, sy = width / new_width, height / new_height
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def _undecoded_jpeg(image: Image.Image) -> memoryview | None:
    """The encoded bytes of a JPEG opened from memory and not yet decoded, if PIL reads it as RGB
    (YCbCr or RGB files; grayscale and CMYK ones arrive already converted by decode_image)."""
    if (
        isinstance(image, JpegImagePlugin.JpegImageFile)
        and image.mode == "RGB"
        and image.tile  # emptied by PIL once the pixels are decoded (and maybe changed since)
        and isinstance(image.fp, io.BytesIO)
    ):
        return image.fp.getbuffer()  # the bytes themselves, not a copy
    return None


class BatchNormalize:
    """uint8 (B, 3, H, W) -> what ToTensor + Normalize give, computed on the batch's device.

    The result lives in a buffer that the next call overwrites: a step uses its batch before the next
    one is normalised. On a CPU a fresh batch of floats (154 MB at 256 x 224 px) would be fresh pages
    every step, a page fault each 4 KiB; on a GPU the caching allocator reuses the memory anyway."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
        self.out: torch.Tensor | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean.device != images.device:  # moved once, not every step
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        out = self.out
        if out is None or out.shape != images.shape or out.device != images.device:
            out = self.out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        return out.copy_(images).div_(255).sub_(self.mean).div_(self.std)  # copy_: from any layout


def decode_image(sample: dict) -> Image.Image:
    """The sample's image in RGB. An RGB file is only opened: PIL decodes it on first use, and
    `TrainTransform` decodes a JPEG's bytes itself. A corrupt file raises then, not here."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            image = _open_header(sample[ext])
            if image.mode == "RGB":
                return image
            with image:
                return image.convert("RGB")
    raise KeyError(f"no image ({'/'.join(IMAGE_EXTENSIONS)}) in sample")


def _open_header(data: bytes) -> Image.Image:
    """PIL's image of `data` with only its header read, refused (ImageTooLarge) beyond the budget."""
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ImageTooLarge(f"{error} (data.max_image_pixels); not decoded") from None
    check_pixels(*image.size)  # where PIL's own check is off (MAX_IMAGE_PIXELS None)
    return image


def decode_captions(sample: dict) -> list[str]:
    """`.txt` holds one caption or several, one per line."""
    if "txt" not in sample:
        raise KeyError("no .txt caption in sample")
    captions = [line.strip() for line in sample["txt"].decode("utf-8").splitlines() if line.strip()]
    if not captions:
        raise ValueError("empty caption")
    return captions


def transforms_for(
    image_encoder: object, random_crop_scale: Sequence[float] | None = None
) -> tuple[TrainTransform, T.Compose, BatchNormalize]:
    """From the tower's `image_size`, `mean` and `std`: the train transform (uint8 out), the eval
    transform (normalised float out) and the batch normalisation that completes the train transform."""
    size, mean, std = image_encoder.image_size, image_encoder.mean, image_encoder.std
    train = TrainTransform(size, random_crop_scale)
    return train, image_transform(size, mean, std), BatchNormalize(mean, std)
