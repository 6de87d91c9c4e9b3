"""Image preprocessing: decode bytes, resize, crop, normalise (open_clip's eval transform by default)."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image
from torchvision import transforms as T

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def image_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    random_crop_scale: Sequence[float] | None = None,
) -> T.Compose:
    if random_crop_scale:
        resize = [
            T.RandomResizedCrop(
                image_size, scale=tuple(random_crop_scale), interpolation=T.InterpolationMode.BICUBIC
            )
        ]
    else:
        resize = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])


def decode_image(sample: dict) -> Image.Image:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            with Image.open(io.BytesIO(sample[ext])) as image:
                return image.convert("RGB")
    raise KeyError(f"no image ({'/'.join(IMAGE_EXTENSIONS)}) in sample")


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
) -> tuple[T.Compose, T.Compose]:
    """(train, eval) transforms from the tower's `image_size`, `mean` and `std`."""
    size, mean, std = image_encoder.image_size, image_encoder.mean, image_encoder.std
    return image_transform(size, mean, std, random_crop_scale), image_transform(size, mean, std)
