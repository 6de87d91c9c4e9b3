"""The files of a tar stream, read straight from its 512-byte headers.

A shard's files are read once per pass on every data worker, so the reader's cost counts: tarfile parses
every header field (and two headers per file for the PAX tars Python and webdataset write), about 60 us
per file, against 0.8 ms to decode a 640x480 JPEG. This reader takes only what a sample needs (name, size, type,
PAX `path` and `size`, GNU long names), checks each header's checksum, and costs about 13 us.
Compressed tars (.tar.gz, .tar.bz2, .tar.xz) go through tarfile, which decompresses them.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz
REGULAR = (b"0", b"\0", b"7")
INVALID = "invalid tar header: not a tar, or corrupt"
SKIPPED = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata files (__index__, ...): not sample files


def tar_files(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file, in order. Raises tarfile.ReadError for a stream that is not
    a tar, a corrupt header or a file cut short. Stops at the end-of-archive block, which it consumes,
    or quietly at the end of the stream between two files, as tarfile does (the caller checks)."""
    first = _read(stream, BLOCK, exact=False)
    if not first:
        raise tarfile.ReadError("empty file")
    if first.startswith(COMPRESSED):
        yield from _tarfile_files(_Replayed(first, stream))
        return
    header, extended, shared = first, {}, {}  # extended: the next file's PAX/GNU fields; shared: global
    while header:
        if len(header) < BLOCK:
            raise tarfile.ReadError("unexpected end of data")
        if not any(header):
            return
        kind, size = header[156:157], _size(header, extended)
        data = _read(stream, size)
        _read(stream, -size % BLOCK)  # padding to the next block
        if kind == b"x":
            extended = _pax(data)
        elif kind == b"g":
            shared = shared | _pax(data)
        elif kind == b"L":
            extended = {"path": data.rstrip(b"\0").decode("utf-8", "surrogateescape")}
        else:
            name = extended.get("path") or shared.get("path") or _name(header)
            if kind in REGULAR and not SKIPPED.match(name):
                yield name, data
            extended = {}
        header = _read(stream, BLOCK, exact=False)


def _size(header: bytes, extended: dict[str, str]) -> int:
    if not _checksum_ok(header):
        raise tarfile.ReadError(f"{INVALID} (bad checksum)")
    if "size" in extended:
        return int(extended["size"])
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256, for files of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    return _octal(field)


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])  # the field itself counts as 8 spaces
    return stored == unsigned


def _octal(field: bytes) -> int:
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"{INVALID} (not a number: {field!r})") from None


def _name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\x00":  # POSIX: long paths are split into prefix / name
        prefix = header[345:500].split(b"\0", 1)[0]
        name = prefix + b"/" + name if prefix else name
    return name.decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    """PAX records: b"<length> <key>=<value>\\n", one after another."""
    fields, at = {}, 0
    while at < len(data) and data[at] != 0:
        length = int(data[at : data.index(b" ", at)])
        key, _, value = data[data.index(b" ", at) + 1 : at + length - 1].partition(b"=")
        fields[key.decode()] = value.decode("utf-8", "surrogateescape")
        at += length
    return fields


def _read(stream: BinaryIO, size: int, exact: bool = True) -> bytes:
    """`size` bytes; fewer only at the end of the stream, and then an error if `exact`."""
    data = stream.read(size) if size else b""
    while len(data) < size:  # a pipe or socket may return less than asked
        more = stream.read(size - len(data))
        if not more:
            if exact:
                raise tarfile.ReadError("unexpected end of data")
            break
        data += more
    return data


def _tarfile_files(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        for member in archive:
            if member.isreg() and not SKIPPED.match(member.name):
                yield member.name, archive.extractfile(member).read()
            archive.members = []  # a stream's members are not kept


class _Replayed:
    """`stream` with `head`, already read from it, put back in front."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data + (self.stream.read(size - len(data)) if size > len(data) else b"")
