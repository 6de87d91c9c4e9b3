"""Writing small webdataset tars by hand."""

from __future__ import annotations

import io
from pathlib import Path

import webdataset as wds
from PIL import Image


def png_bytes(colour: tuple[int, int, int] = (255, 0, 0), size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, samples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path
