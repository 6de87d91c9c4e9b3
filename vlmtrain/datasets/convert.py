"""Your own images -> shards: captioned images to training shards, class folders to a zero-shot set.

Caption shards follow the img2dataset / open_clip layout (`{key}.jpg|png|webp` with the original
bytes, `{key}.txt` with one caption per line, `{key}.json` with the source path) plus `sizes.json`.
A classification set follows CLIP_benchmark's (`classnames.txt`, templates, `test/{0..}.tar` with
`.cls` labels). Bad inputs are skipped and counted, and the output appears only once it is complete.
The input folder is the boundary: a file in it that links out of it is skipped and counted. A folder
written here holds a `.vlmtrain-data` marker, and `--overwrite` replaces only a folder that holds one.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from vlmtrain.atomic import staged_folder

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # what the training readers decode
DEFAULT_TEMPLATES = (
    "a photo of a {c}.",
    "a bad photo of a {c}.",
    "a close-up photo of a {c}.",
    "a cropped photo of the {c}.",
    "a photo of the small {c}.",
    "a photo of the large {c}.",
    "a bright photo of a {c}.",
    "a dark photo of the {c}.",
    "art of the {c}.",
    "a rendering of a {c}.",
)
UNREADABLE, NO_CAPTION, NO_CLASS = "unreadable", "no caption", "not in a class folder"
LINK_OUT = "link out of --images"
MARKER = ".vlmtrain-data"  # in every folder written here: what --overwrite may replace


@dataclass
class Report:
    """What a conversion wrote and why it skipped what it skipped."""

    out: Path
    written: int = 0
    shards: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skipped_line(self) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"skipped {sum(self.skipped.values())}" + (f" ({reasons})" if reasons else "")

    def summary(self) -> str:
        shards = f"{self.shards} shard" + ("s" if self.shards != 1 else "")
        return f"wrote {self.written} samples in {shards} to {self.out}; {self.skipped_line()}"


class ShardSink:
    """Writes samples into `folder/{index}.tar` shards of at most `per_shard` samples, then sizes.json."""

    def __init__(self, folder: Path, per_shard: int, name: str = "{:06d}.tar") -> None:
        if per_shard < 1:
            raise ValueError(f"--samples-per-shard: must be at least 1, got {per_shard}")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.per_shard, self.name = folder, per_shard, name
        self.sizes: dict[str, int] = {}
        self.writer: wds.TarWriter | None = None

    def write(self, sample: dict) -> None:
        if self.writer is None or self.sizes[self.current] == self.per_shard:
            self._next_shard()
        self.writer.write(sample)
        self.sizes[self.current] += 1

    def _next_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.current = self.name.format(len(self.sizes))
        self.sizes[self.current] = 0
        # A fixed mtime makes the same input give byte-identical shards.
        self.writer = wds.TarWriter(str(self.folder / self.current), mtime=0, encoder=False)

    def close(self) -> dict[str, int]:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        (self.folder / "sizes.json").write_text(json.dumps(self.sizes, indent=1))
        return self.sizes


@contextmanager
def staged(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A scratch folder that replaces `out` only if the block succeeds; `out` must be new or empty
    unless `overwrite`."""
    out = Path(out).expanduser()
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not overwrite):
        raise FileExistsError(f"--out: {out} exists and is not an empty directory (--overwrite replaces one)")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(
            f"--out: {out} was not written by vlmtrain-data (no {MARKER} in it); --overwrite replaces only "
            "a folder it wrote: remove it yourself or choose another --out"
        )
    with staged_folder(out) as staging:
        (staging / MARKER).write_text("written by vlmtrain-data; --overwrite may replace this folder\n")
        yield staging


def read_image(path: Path) -> tuple[bytes, str]:
    """The file's bytes and shard extension; raises if PIL cannot fully decode it."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.verify()  # checksums and structure
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # truncated pixel data only shows up on decoding
        kind = image.format
    if kind not in FORMAT_EXTENSIONS:
        raise ValueError(f"unsupported image format {kind}")
    return data, FORMAT_EXTENSIONS[kind]


def absolute(path: Path) -> Path:
    """Absolute and normalised but with symlinks kept, so a folder scan and a table name files alike."""
    return Path(os.path.abspath(path.expanduser()))


def find_images(root: Path) -> list[Path]:
    """Image files anywhere under `root` but in hidden folders, as sorted absolute paths."""
    root = absolute(root)
    files = (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return sorted(p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts))


def links_out(root: Path, paths: Iterable[Path]) -> set[Path]:
    """Those of `paths` inside `root` that are, or pass through, a link to somewhere outside it."""
    root, real_root = absolute(root), root.resolve()
    return {p for p in paths if p.is_relative_to(root) and not p.resolve().is_relative_to(real_root)}


def clean_captions(lines: Iterable[str]) -> list[str]:
    """One caption per entry, inner whitespace (including newlines) collapsed, empty ones dropped."""
    return [" ".join(line.split()) for line in lines if line.strip()]


def folder_captions(images: list[Path], root: Path) -> dict[Path, list[str]]:
    """Captions from the `.txt` beside each image (same stem), one per line; a `.txt` that links out of
    `root` is not read."""
    found = {}
    for image in images:
        text = image.with_suffix(".txt")
        if text.is_file() and not links_out(root, [text]):
            found[image] = clean_captions(text.read_text(encoding="utf-8", errors="replace").splitlines())
    return found


def table_captions(table: str | Path, image_column: str, caption_column: str) -> dict[Path, list[str]]:
    """Captions from a CSV/TSV; image paths are relative to the table or absolute, rows may repeat."""
    table = Path(table).expanduser()
    if not table.is_file():
        raise FileNotFoundError(f"--captions: no such file {table}")
    delimiter = "\t" if table.suffix.lower() in (".tsv", ".tab") else ","
    with open(table, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream, delimiter=delimiter)
        for column, flag in ((image_column, "--image-column"), (caption_column, "--caption-column")):
            if column not in (reader.fieldnames or []):
                raise ValueError(f"{flag}: {table} has no column {column!r} (has {reader.fieldnames})")
        found: dict[Path, list[str]] = {}
        for row in reader:
            if not (row[image_column] or "").strip():  # a short or blank row names no image
                continue
            path = absolute(table.parent / Path(row[image_column].strip()).expanduser())
            found.setdefault(path, []).extend(clean_captions([row[caption_column] or ""]))
    return found


def _image_dir(images: str | Path) -> Path:
    root = Path(images).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--images: no such directory {root}")
    return root


def _finish(report: Report, sink: ShardSink) -> None:
    report.shards = len(sink.close())
    if report.written == 0:
        raise ValueError(f"--images: no usable image found, {report.skipped_line()}")


def write_caption_shards(
    images: str | Path,
    out: str | Path,
    captions: str | Path | None = None,
    *,
    samples_per_shard: int = 1000,
    image_column: str = "path",
    caption_column: str = "caption",
    overwrite: bool = False,
) -> Report:
    """Image files with captions (`.txt` beside each image, or a table) -> caption shards in `out`."""
    root = _image_dir(images)
    found = find_images(root)
    table = (
        table_captions(captions, image_column, caption_column) if captions else folder_captions(found, root)
    )
    candidates = sorted(set(found) | set(table))
    outside = links_out(root, candidates)
    if not captions:  # an image whose caption file links out is skipped as well
        outside |= {p for p in found if links_out(root, [p.with_suffix(".txt")])}
    report = Report(Path(out).expanduser())
    with staged(out, overwrite) as staging:
        sink = ShardSink(staging, samples_per_shard)
        for path in tqdm(candidates, desc="shards", unit="img", mininterval=0.5):
            if path in outside:
                report.skipped[LINK_OUT] += 1
                continue
            if not table.get(path):
                report.skipped[NO_CAPTION] += 1
                continue
            try:
                data, ext = read_image(path)
            except Exception:  # any undecodable or missing file is skipped, never fatal
                report.skipped[UNREADABLE] += 1
                continue
            meta = json.dumps({"path": str(path)}).encode()
            text = "\n".join(table[path]).encode()
            sink.write({"__key__": f"{report.written:09d}", ext: data, "txt": text, "json": meta})
            report.written += 1
        _finish(report, sink)
    return report


def read_templates(path: str | Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_TEMPLATES)
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--templates: no such file {path}")
    templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for line in templates:
        if "{c}" not in line:
            raise ValueError(f"--templates: {path}: template {line!r} has no {{c}} placeholder")
    if not templates:
        raise ValueError(f"--templates: {path} holds no templates")
    return templates


def write_task_files(root: Path, classnames: list[str], templates: list[str]) -> None:
    """CLIP_benchmark's side files; `root/test` must already hold the shards."""
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    nshards = len(list((root / "test").glob("*.tar")))
    (root / "test" / "nshards.txt").write_text(f"{nshards}\n")


def write_classification_set(
    images: str | Path,
    out: str | Path,
    templates: str | Path | None = None,
    samples_per_shard: int = 1000,
    overwrite: bool = False,
) -> Report:
    """An ImageFolder tree (`images/<class name>/*.jpg`) -> a zero-shot classification set in `out`."""
    root = absolute(_image_dir(images))
    prompts = read_templates(templates)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    labels = {name: index for index, name in enumerate(folders)}  # sorted folders, as in ImageFolder
    report = Report(Path(out).expanduser())
    with staged(out, overwrite) as staging:
        sink = ShardSink(staging / "test", samples_per_shard, name="{}.tar")
        found = find_images(root)
        outside = links_out(root, found)
        for path in tqdm(found, desc="classification", unit="img", mininterval=0.5):
            relative = path.relative_to(root)
            if path in outside:
                report.skipped[LINK_OUT] += 1
                continue
            if len(relative.parts) < 2:  # directly in `images`, not in a class folder
                report.skipped[NO_CLASS] += 1
                continue
            try:
                data, ext = read_image(path)
            except Exception:  # any undecodable file is skipped, never fatal
                report.skipped[UNREADABLE] += 1
                continue
            label = str(labels[relative.parts[0]]).encode()
            meta = json.dumps({"path": str(path)}).encode()
            sink.write({"__key__": f"{report.written:09d}", ext: data, "cls": label, "json": meta})
            report.written += 1
        _finish(report, sink)
        write_task_files(staging, [name.replace("_", " ") for name in folders], prompts)
    return report
