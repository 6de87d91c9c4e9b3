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


def keyed_shards(root: Path, counts: list[int], prefix: str = "s", size: int = 8) -> list[str]:
    """Shards of tiny PNGs with keys '{prefix}{shard}_{index}' and a sizes.json listing them."""
    import json

    paths, listed = [], {}
    for s, count in enumerate(counts):
        samples = [
            {
                "__key__": f"{prefix}{s}_{i:05d}",
                "png": png_bytes((s * 40 % 255, i % 255, 7), size),
                "txt": f"{s} {i}",
            }
            for i in range(count)
        ]
        paths.append(str(write_tar(root / f"{prefix}-{s:06d}.tar", samples)))
        listed[f"{prefix}-{s:06d}.tar"] = count
    (root / "sizes.json").write_text(json.dumps(listed))
    return paths


def cut_after_samples(path: Path, samples: int) -> None:
    """Cut a tar right after its first `samples` samples (2 members each): a truncation no reader notices."""
    import tarfile

    with tarfile.open(path) as tar:
        members = tar.getmembers()
    end = members[2 * samples - 1].offset_data + members[2 * samples - 1].size
    path.write_bytes(path.read_bytes()[: (end + 511) // 512 * 512])


def corrupt_matrix(root: Path, seed: int) -> tuple[int, dict[str, int]]:
    """Shards with every kind of bad input, named so that with `seed` and one slot the last shard of the
    first pass is a whole one: after the pass's last good sample every fault has been counted once.
    Returns the good samples of a pass and the counts by reason."""
    import json

    from vlmtrain.data.cursor import ShardOrder

    def good(name: str, count: int) -> list[dict]:
        return [
            {"__key__": f"{name}{i}", "png": png_bytes((i, 9, 9), 8), "txt": f"{name} {i}"}
            for i in range(count)
        ]

    shards = {
        "a": good("a", 5) + [{"__key__": "undecodable", "png": b"not an image", "txt": "x"}]
        + good("a_", 4) + [{"__key__": "noimage", "txt": "x"}] + good("a__", 3),
        "b": good("b", 4) + [{"__key__": "empty", "png": png_bytes(), "txt": " \n"}]
        + good("b_", 3) + [{"__key__": "nocaption", "png": png_bytes()}]
        + [{"__key__": "latin1", "png": png_bytes(), "txt": "caf\xe9".encode("latin-1")}] + good("b__", 5),
        "c": good("c", 12),  # cut to its first 6 samples below
        "d": [],  # zero bytes
        "e": good("e", 12),
        "f": good("f", 12),
    }  # fmt: skip
    names = [str(root / f"{name}.tar") for name in shards]
    order = ShardOrder(names, seed, 0, 0, 1, False)
    assert order[len(names) - 1].endswith(("a.tar", "b.tar", "e.tar", "f.tar")), "pick another seed"
    for name, samples in shards.items():
        write_tar(root / f"{name}.tar", samples)
    cut_after_samples(root / "c.tar", 6)
    (root / "d.tar").write_bytes(b"")
    (root / "sizes.json").write_text(json.dumps({f"{n}.tar": len(s) for n, s in shards.items()}))
    return 12 + 12 + 6 + 12 + 12, {"image": 2, "caption": 3, "truncated": 1, "unreadable": 1}


def reshard(source: Path, target: Path, shards: int) -> Path:
    """The samples of the split folder `source`, in order, as `shards` equal shards (and their sizes.json)
    under `target`: copied bytes, nothing decoded or drawn again."""
    import json

    samples = [
        {key: value for key, value in sample.items() if key == "__key__" or not key.startswith("__")}
        for tar in sorted(source.glob("*.tar"))
        for sample in wds.WebDataset(str(tar), shardshuffle=False)
    ]
    per_shard, sizes = -(-len(samples) // shards), {}
    for s in range(shards):
        part = samples[s * per_shard : (s + 1) * per_shard]
        write_tar(target / f"{s:06d}.tar", part)
        sizes[f"{s:06d}.tar"] = len(part)
    (target / "sizes.json").write_text(json.dumps(sizes))
    return target
