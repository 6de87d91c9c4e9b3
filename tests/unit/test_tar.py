"""vlmtrain's tar reader against tarfile: the same files from tars in every format Python writes (PAX,
GNU, USTAR), with long names, directories, links and metadata files among them, compressed or not; and
a clear error for what is not a whole tar."""

import io
import random
import tarfile

import pytest

from vlmtrain.data.tar import tar_files

FORMATS = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}


def _tar(fmt: int, files: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode, format=fmt) as archive:
        folder = tarfile.TarInfo("some/folder")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for n, (name, data) in enumerate(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000 + n
            archive.addfile(info, io.BytesIO(data))
            if n == 1:
                link = tarfile.TarInfo("a-link.jpg")
                link.type, link.linkname = tarfile.SYMTYPE, name
                archive.addfile(link)
    return out.getvalue()


def _reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive if m.isreg() and "__" not in m.name]


def _files(rng: random.Random, long_names: bool) -> list[tuple[str, bytes]]:
    files = []
    for n in range(6):
        stem = f"{'deep/' * 30 if long_names and n % 2 else ''}sample{n:04d}"
        for ext in ("jpg", "txt", "json"):
            files.append((f"{stem}.{ext}", rng.randbytes(rng.choice([0, 1, 511, 512, 513, 5000]))))
    files.insert(3, ("__index__", b"meta"))
    return files


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_the_same_files_as_tarfile(name, mode):
    rng = random.Random(name + mode)
    long_names = name != "ustar"  # USTAR holds paths up to 255 bytes in prefix + name
    files = _files(rng, long_names)
    data = _tar(FORMATS[name], files, mode)
    read = list(tar_files(io.BytesIO(data)))
    assert read == _reference(data) == [f for f in files if not f[0].startswith("__")]


def test_ustar_paths_split_into_prefix_and_name():
    name = "a" * 120 + "/" + "b" * 90 + ".jpg"
    data = _tar(tarfile.USTAR_FORMAT, [(name, b"x" * 700)])
    assert list(tar_files(io.BytesIO(data))) == [(name, b"x" * 700)] == _reference(data)


class Trickle(io.RawIOBase):
    """A pipe that returns at most 100 bytes per read."""

    def __init__(self, data: bytes) -> None:
        self.data = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self.data.read(min(size, 100) if size >= 0 else 100)


def test_short_reads_are_completed():
    data = _tar(tarfile.PAX_FORMAT, _files(random.Random(1), True))
    assert list(tar_files(Trickle(data))) == _reference(data)


def test_what_is_not_a_whole_tar_raises():
    data = _tar(tarfile.PAX_FORMAT, _files(random.Random(2), False))
    with pytest.raises(tarfile.ReadError, match="empty file"):
        list(tar_files(io.BytesIO(b"")))
    with pytest.raises(tarfile.ReadError, match="not a tar"):
        list(tar_files(io.BytesIO(b"not a tar at all" * 100)))
    with pytest.raises(tarfile.ReadError, match="unexpected end"):
        list(tar_files(io.BytesIO(data[: 512 * 5 + 100])))  # inside a file's data
    corrupt = bytearray(data)
    corrupt[512 * 3 + 10] ^= 0xFF  # a byte of a later header
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_files(io.BytesIO(bytes(corrupt))))
    cut = list(tar_files(io.BytesIO(data[: 512 * 3])))  # between two files: ends quietly, as tarfile
    assert cut == _reference(data[: 512 * 3])
