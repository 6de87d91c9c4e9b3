"""Dataset tools: image folders and caption tables -> shards, class folders -> zero-shot sets, read back."""

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from vlmtrain.cli import data as data_cli
from vlmtrain.data.shards import expand_shards, read_shard
from vlmtrain.data.stream import ShardStream
from vlmtrain.datasets import convert
from vlmtrain.datasets.convert import write_caption_shards, write_classification_set
from vlmtrain.eval.zeroshot import zeroshot_classification
from vlmtrain.models.two_tower import TwoTower

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def save_image(path: Path, seed: int = 0, colour=None, size: int = 8) -> bytes:
    """A small noise image (or a flat colour) in the format the suffix names; returns the file bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if colour is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", (size, size), colour)
    fmt = FORMATS[path.suffix]
    image.save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return path.read_bytes()


def read_all(out: Path) -> list[dict]:
    """Every sample of a shard set, in shard then key order, checking sizes.json on the way."""
    sizes = json.loads((out / "sizes.json").read_text())
    samples = []
    for shard in expand_shards(str(out)):
        found = list(read_shard(shard, on_error=lambda exc: False))
        assert sizes[Path(shard).name] == len(found)
        samples += found
    assert sum(sizes.values()) == len(samples)
    return samples


def image_bytes(sample: dict) -> tuple[str, bytes]:
    (ext,) = [e for e in ("jpg", "png", "webp") if e in sample]
    return ext, sample[ext]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        data_cli(argv)
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def captioned(tmp_path) -> tuple[Path, dict[str, tuple[bytes, list[str]]]]:
    """A folder of images in every format, nested, with one or several captions in a .txt beside each."""
    root = tmp_path / "images"
    expected = {}
    for i, name in enumerate(["b.png", "a.jpg", "sub/c.webp", "sub/d.jpeg", "e.png"]):
        captions = [f"caption {i} number {n}" for n in range(1 + i % 3)]
        data = save_image(root / name, seed=i)
        (root / name).with_suffix(".txt").write_text("\n".join(captions) + "\n\n")
        expected[str((root / name).absolute())] = (data, captions)
    return root, expected


def test_folder_with_txt_captions_round_trips_through_read_shard(captioned, tmp_path):
    root, expected = captioned
    report = write_caption_shards(root, tmp_path / "out", samples_per_shard=2)
    assert (report.written, report.shards, sum(report.skipped.values())) == (5, 3, 0)
    samples = read_all(tmp_path / "out")
    assert [s["__key__"] for s in samples] == sorted(s["__key__"] for s in samples)
    paths = [json.loads(s["json"])["path"] for s in samples]
    assert paths == sorted(expected)
    for sample, path in zip(samples, paths):
        data, captions = expected[path]
        ext, stored = image_bytes(sample)
        assert (
            stored == data
            and ext == {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[FORMATS[Path(path).suffix]]
        )
        assert sample["txt"].decode() == "\n".join(captions)


@pytest.mark.parametrize("suffix,delimiter", [(".csv", ","), (".tsv", "\t")])
def test_caption_table_relative_absolute_and_repeated_rows(tmp_path, suffix, delimiter):
    images = tmp_path / "data" / "images"
    one, two = save_image(images / "one.png", 1), save_image(images / "two.jpg", 2)
    rows = [
        ("file", "text", "other"),
        ("images/one.png", '"a dog, running"', "x"),
        (str(images / "two.jpg"), "a cat", "y"),
        ("images/one.png", "a second caption", "z"),
        ("images/missing.png", "a file that is not there", "q"),
        ("images/one.png",),
        ("", "a caption without an image", "r"),
    ]
    table = tmp_path / "data" / f"captions{suffix}"
    table.write_text("\n".join(delimiter.join(row) for row in rows) + "\n")
    report = write_caption_shards(images, tmp_path / "out", table, image_column="file", caption_column="text")
    assert report.written == 2 and report.skipped == {"unreadable": 1}
    samples = read_all(tmp_path / "out")
    assert image_bytes(samples[0]) == ("png", one) and image_bytes(samples[1]) == ("jpg", two)
    assert samples[0]["txt"].decode() == "a dog, running\na second caption"
    assert samples[1]["txt"].decode() == "a cat"


def test_corrupt_and_uncaptioned_images_are_skipped_and_counted(captioned, tmp_path, capsys):
    root, expected = captioned
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "broken.txt").write_text("a caption for a broken file")
    for name in ("truncated.png", "truncated.jpg"):  # PNG fails verify(), JPEG only fails decoding
        truncated = save_image(root / name, seed=9, size=64)
        (root / name).write_bytes(truncated[: len(truncated) // 2])
    (root / "truncated.txt").write_text("a caption")
    save_image(root / "nocaption.png", seed=10)
    save_image(root / "empty.png", seed=11)
    (root / "empty.txt").write_text("\n  \n")

    code, out, _ = run_cli(["shards", "--images", str(root), "--out", str(tmp_path / "out")], capsys)
    assert code == 0
    assert out.strip().splitlines()[-1].endswith("skipped 5 (2 no caption, 3 unreadable)")
    assert [json.loads(s["json"])["path"] for s in read_all(tmp_path / "out")] == sorted(expected)


def test_training_stream_yields_each_converted_pair(captioned, tmp_path):
    root, expected = captioned
    write_caption_shards(root, tmp_path / "out", samples_per_shard=2)
    captions = sorted(c for _, caps in expected.values() for c in caps)
    pixels = {
        c: T.functional.to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))
        for data, caps in expected.values()
        for c in caps
    }
    stream = ShardStream(
        [expand_shards(str(tmp_path / "out"))],
        transform=T.ToTensor(),
        tokenizer=lambda texts: torch.tensor([captions.index(t) for t in texts]),
        batch_size=1,
        shuffle_buffer=3,
    )
    owner = {c: path for path, (_, caps) in expected.items() for c in caps}
    seen = []
    for batch in itertools.islice(stream.slot_batches(0, 1), len(expected)):  # one pass
        images, caption = batch["images"], captions[batch["tokens"].item()]
        assert torch.equal(images[0], pixels[caption]), caption
        seen.append(owner[caption])
    assert sorted(seen) == sorted(expected)


def test_same_input_gives_byte_identical_shards(captioned, tmp_path):
    root, _ = captioned
    write_caption_shards(root, tmp_path / "a", samples_per_shard=2)
    write_caption_shards(root, tmp_path / "b", samples_per_shard=2)
    for shard in sorted((tmp_path / "a").iterdir()):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["shards", "--images", "{tmp}/absent"], "--images: no such directory"),
        (
            ["shards", "--images", "{tmp}/images", "--captions", "{tmp}/absent.csv"],
            "--captions: no such file",
        ),
        (
            ["shards", "--images", "{tmp}/images", "--captions", "{tmp}/t.csv"],
            "--image-column: {tmp}/t.csv has no column 'path'",
        ),
        (
            ["shards", "--images", "{tmp}/images", "--image-column", "image", "--captions", "{tmp}/t.csv"],
            "no column 'caption'",
        ),
        (
            ["classification", "--images", "{tmp}/images", "--templates", "{tmp}/t.csv"],
            "no {{c}} placeholder",
        ),
        (["shards", "--images", "{tmp}/images", "--out", "{tmp}/full"], "--out: {tmp}/full exists"),
    ],
)
def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, capsys, argv, needle):
    save_image(tmp_path / "images" / "x" / "a.png")
    (tmp_path / "t.csv").write_text("image,text\nimages/x/a.png,hello\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code, _, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert needle.format(tmp=tmp_path) in lines[0]
    assert not (tmp_path / "out").exists() and (tmp_path / "full" / "keep").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "images", "t.csv"]


def test_nothing_to_write_is_an_error(tmp_path, capsys):
    save_image(tmp_path / "images" / "a.png")
    code, _, err = run_cli(
        ["shards", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out")], capsys
    )
    assert code == 2 and err.strip().splitlines()[-1].endswith(
        "no usable image found, skipped 1 (1 no caption)"
    )
    assert not (tmp_path / "out").exists()


def test_crash_midway_leaves_the_previous_output_untouched(captioned, tmp_path, monkeypatch):
    root, _ = captioned
    out = tmp_path / "out"
    write_caption_shards(root, out, samples_per_shard=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing(path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path)

    real = convert.read_image
    monkeypatch.setattr(convert, "read_image", failing)
    with pytest.raises(KeyboardInterrupt):
        write_caption_shards(root, out, samples_per_shard=1, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out"]


def test_overwrite_replaces_previous_output(captioned, tmp_path):
    root, _ = captioned
    write_caption_shards(root, tmp_path / "out", samples_per_shard=1)
    write_caption_shards(root, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".vlmtrain-data",
        "000000.tar",
        "sizes.json",
    ]


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class MeanColour(torch.nn.Module):
    def forward(self, images):
        return images.mean((2, 3))


class TokensAsColour(torch.nn.Module):
    def forward(self, tokens):
        return tokens.float()


def colour_model() -> TwoTower:
    """Embeds an image as its mean RGB, and a prompt (tokenised as an RGB triple) as that triple."""
    return TwoTower(MeanColour(), TokensAsColour(), embed_dim=3)


def colour_tokens(prompts: list[str]) -> torch.Tensor:
    return torch.tensor([next(v for k, v in COLOURS.items() if k in p) for p in prompts])


def test_classification_set_is_read_by_zeroshot_with_correct_labels(tmp_path, capsys):
    images = tmp_path / "images"
    counts = {"red_apple": 3, "green_tree": 2, "blue_sky": 4}
    for folder, n in counts.items():
        for i in range(n):
            save_image(images / folder / f"{i}.png", colour=COLOURS[folder.split("_")[0]])
    save_image(images / "stray.png", colour=(9, 9, 9))
    (images / "red_apple" / "broken.jpg").write_bytes(b"nope")
    (tmp_path / "templates.txt").write_text("a photo of a {c}.\n\nan image of the {c}\n")
    argv = ["classification", "--images", str(images), "--out", str(tmp_path / "zs")]
    code, out, _ = run_cli(
        [*argv, "--templates", str(tmp_path / "templates.txt"), "--samples-per-shard", "4"], capsys
    )
    assert code == 0 and "skipped 2 (1 not in a class folder, 1 unreadable)" in out

    zs = tmp_path / "zs"
    assert (zs / "classnames.txt").read_text().splitlines() == ["blue sky", "green tree", "red apple"]
    templates = (zs / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates == ["a photo of a {c}.", "an image of the {c}"]
    assert (zs / "test" / "nshards.txt").read_text().strip() == "3"
    assert sorted(p.name for p in (zs / "test").glob("*.tar")) == ["0.tar", "1.tar", "2.tar"]
    labels = [int(s["cls"]) for s in read_all(zs / "test")]
    assert labels == [0] * 4 + [1] * 2 + [2] * 3

    results = zeroshot_classification(colour_model(), colour_tokens, T.ToTensor(), zs)
    assert results["acc1"] == 1.0 and results["num_samples"] == 9 and results["num_classes"] == 3


def test_classification_default_templates_have_placeholders(tmp_path):
    save_image(tmp_path / "images" / "cat" / "a.png")
    write_classification_set(tmp_path / "images", tmp_path / "zs")
    templates = (tmp_path / "zs" / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert len(templates) >= 5 and all("{c}" in t for t in templates)


def test_links_out_of_the_images_folder_are_skipped_and_counted(captioned, tmp_path, capsys):
    root, expected = captioned
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("a private note\n")
    save_image(secret.parent / "photo.png", seed=9)
    (root / "a.txt").unlink()
    (root / "a.txt").symlink_to(secret)  # a caption file linking out
    (root / "linked.png").symlink_to(secret.parent / "photo.png")  # an image linking out
    (root / "linked.txt").write_text("a caption\n")
    (root / "sub" / "inner.png").symlink_to(root / "b.png")  # a link inside the folder is kept
    (root / "sub" / "inner.txt").write_text("inner\n")
    code, out, _ = run_cli(["shards", "--images", str(root), "--out", str(tmp_path / "out")], capsys)
    assert code == 0 and "skipped 2 (2 link out of --images)" in out, out
    captions = [sample["txt"].decode() for sample in read_all(tmp_path / "out")]
    assert len(captions) == len(expected) and not any("private" in c for c in captions)
    assert "inner" in captions


def test_overwrite_replaces_only_a_folder_it_wrote(captioned, tmp_path, capsys):
    root, _ = captioned
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    args = ["shards", "--images", str(root), "--overwrite", "--out"]
    code, _, err = run_cli([*args, str(theirs)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "was not written by vlmtrain-data" in lines[0], err
    assert sorted(p.name for p in theirs.iterdir()) == ["thesis.tex"]
    assert run_cli([*args, str(tmp_path / "ours"), "--samples-per-shard", "1"], capsys)[0] == 0
    assert run_cli([*args, str(tmp_path / "ours")], capsys)[0] == 0  # its own folder: replaced
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [
        ".vlmtrain-data",
        "000000.tar",
        "sizes.json",
    ]
