"""Image preprocessing: decode bytes, resize, crop, normalise (open_clip's eval transform by default).

Training batches leave the data workers as uint8 and are normalised where the model runs
(`BatchNormalize`): a quarter of the bytes through worker IPC, pinning and the host-to-GPU copy, and
no per-sample float work in the workers. The arithmetic is ToTensor's and Normalize's, so the values
are the same bits as the float transform's."""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


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


class BatchNormalize:
    """uint8 (B, 3, H, W) -> what ToTensor + Normalize give, computed on the batch's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean.device != images.device:  # moved once, not every step
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return images.float().div_(255).sub_(self.mean).div_(self.std)


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
) -> tuple[T.Compose, T.Compose, BatchNormalize]:
    """From the tower's `image_size`, `mean` and `std`: the train transform (uint8 out), the eval
    transform (normalised float out) and the batch normalisation that completes the train transform."""
    size, mean, std = image_encoder.image_size, image_encoder.mean, image_encoder.std
    train = image_transform(size, mean, std, random_crop_scale, normalize=False)
    return train, image_transform(size, mean, std), BatchNormalize(mean, std)
