import io
import os
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic dataset shared by the tests that train or evaluate."""
    from vlmtrain.data.synthetic import write_synthetic

    return write_synthetic(
        tmp_path_factory.mktemp("data") / "synthetic", train_samples=3000, val_samples=300, seed=1
    )


def png_bytes(colour=(255, 0, 0), size=16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, samples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path
