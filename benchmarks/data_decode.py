"""Decode speed on photo-sized JPEGs: vlmtrain's training stream vs open_clip's loader vs raw ceilings.

Writes 3,000 photo-like JPEGs (crops of scikit-learn's china.jpg and flower.jpg, resized to
480x360-640x480 with sensor-like noise, 30-90 KB, nothing downloaded) into 6 webdataset shards, then
measures samples/s at batch 256, 224 px, 2 workers for:

- vlmtrain's stream: its real loader with the training transform (decode_jpeg + torch's bicubic),
  and the same loader with the PIL transform it used before;
- open_clip_train's loader (`get_wds_dataset`, its own train transform: RandomResizedCrop(0.9, 1.0),
  float normalisation) on the same shards, run under its own venv (`bash benchmarks/openclip_env.sh`);
- ceilings: the same JPEG bytes decoded, resized and center-cropped in a tight loop by as many
  processes as workers, with PIL (decode + bicubic), PIL with `draft` (DCT-domain reduction to no
  less than 224 px) and `torchvision.io.decode_jpeg` + torch's antialiased bicubic.

The streams are timed from the moment every worker has delivered its first batch to the last batch
(two epochs), the ceilings from a common start to the last process's end; each with one torch thread
per process, as DataLoader workers run. Measurements alternate within each repeat, in a rotating
order, and the table shows medians over repeats and each row's ratio to the decode_jpeg ceiling of
the same repeat (median over repeats). CPU ms/sample, less moved by other jobs than the wall clock,
is a stream's whole run (main process and workers, start-up included) per sample delivered, and a
ceiling's loops per image. PSNR is each path's output against PIL's full decode + bicubic resize +
center crop over the first 300 images (min / median). `--large` instead times one process on
larger JPEGs, where `draft` can reduce by 4 or 8.

    .venv/bin/python benchmarks/data_decode.py [--repeats 3 --openclip-python .venv-openclip/bin/python]
    .venv/bin/python benchmarks/data_decode.py --large

Its top level imports only the standard library: it is also the open_clip child, under open_clip's venv.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
SIZE, BATCH, WORKERS, SHARDS = 224, 256, 2, 6


class Result(NamedTuple):
    samples_per_s: float
    cpu_ms_per_sample: float


def make_photos(root: Path, count: int, seed: int = 0) -> str:
    """Shards of photo-like JPEGs with a caption each; written once, then reused."""
    pattern = str(root / f"photos-{{000000..{SHARDS - 1:06d}}}.tar")
    if (root / "sizes.json").exists() and sum(
        json.loads((root / "sizes.json").read_text()).values()
    ) == count:
        return pattern
    import numpy as np
    import webdataset as wds
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_sample_images

    sources = [Image.fromarray(array) for array in load_sample_images().images]
    rng, sizes = random.Random(seed), {}
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(SHARDS):
        name = f"photos-{shard:06d}.tar"
        keys = range(shard * count // SHARDS, (shard + 1) * count // SHARDS)
        with wds.TarWriter(str(root / name)) as sink:
            for key in keys:
                which = rng.randrange(len(sources))
                data = _photo(sources[which], rng, np.random.default_rng(key), Image, ImageEnhance)
                caption = f"a photo of {('a chinese temple', 'a flower')[which]}, number {key}"
                sink.write({"__key__": f"{key:06d}", "jpg": data, "txt": caption.encode()})
        sizes[name] = len(keys)
    (root / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return pattern


def _photo(source, rng: random.Random, noise, Image, ImageEnhance) -> bytes:  # noqa: ANN001
    width, height = rng.randrange(480, 641), rng.randrange(360, 481)
    if rng.random() < 0.3:
        width, height = height, width  # portrait
    scale = min(source.width / width, source.height / height) * rng.uniform(0.6, 1.0)
    crop_w, crop_h = int(width * scale), int(height * scale)
    left, top = rng.randrange(source.width - crop_w + 1), rng.randrange(source.height - crop_h + 1)
    image = source.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
    pixels = noise.normal(0, rng.uniform(1.0, 6.0), (height, width, 3)) + image
    image = Image.fromarray(pixels.clip(0, 255).astype("uint8"))
    for quality in (95, 92, 90, 87, 85, 80, 75, 70, 60, 50):  # the best that fits in 90 KB
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        if buffer.tell() <= 90_000:
            break
    return buffer.getvalue()


def read_jpegs(pattern: str) -> list[bytes]:
    from vlmtrain.data.shards import expand_shards, read_shard

    return [raw["jpg"] for shard in expand_shards(pattern, "shards") for raw in read_shard(shard, print)]


# ---- vlmtrain's stream: the only place that knows its loader's API -------------------------------


def vlmtrain_batches(pattern: str, transform: Callable) -> Iterator[int]:
    """Sizes of the batches vlmtrain's training loader yields, endlessly."""
    import open_clip

    from vlmtrain.data.loader import TrainLoader
    from vlmtrain.schema import DataConfig

    config = DataConfig(train_shards=pattern, batch_size=BATCH, num_workers=WORKERS)
    tokenizer = open_clip.SimpleTokenizer(context_length=77)
    for batch in TrainLoader(config, transform, tokenizer, seed=0, reuse_buffers=True):  # as the Trainer
        yield len(batch.images if hasattr(batch, "images") else batch[0])  # a Batch or (images, tokens)


def time_stream(make_batches: Callable[[], Iterator[int]], total: int) -> Result:
    """Samples/s once every worker has delivered its first batch, over `total` samples, and the CPU
    time of the whole run (this process and its workers, start-up included) per sample delivered."""
    cpu, seen, count, start = _cpu_seconds(), 0, 0, None
    batches = make_batches()
    for index, size in enumerate(batches):
        seen += size
        if index == WORKERS - 1:
            start = time.perf_counter()
        elif index >= WORKERS:
            count += size
        if seen >= total:
            break
    rate = count / (time.perf_counter() - start)
    batches.close()  # shuts the workers down and waits for them, so their CPU time is counted
    gc.collect()
    return Result(rate, (_cpu_seconds() - cpu) / seen * 1e3)


def _cpu_seconds() -> float:
    times = os.times()  # children: those waited for, as DataLoader's workers are at shutdown
    return times.user + times.system + times.children_user + times.children_system


# ---- ceilings: tight loops in WORKERS processes ---------------------------------------------------


def decoders() -> dict[str, Callable[[bytes], object]]:
    import torch
    import torchvision.transforms.v2.functional as F
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.io import ImageReadMode, decode_jpeg

    from vlmtrain.data.transforms import image_transform

    pil = image_transform(SIZE, (0.0,) * 3, (1.0,) * 3, normalize=False)
    bicubic = T.InterpolationMode.BICUBIC

    def pil_full(data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as image:
            return pil(image.convert("RGB"))

    def pil_draft(data: bytes, factor: int = 1) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (factor * SIZE,) * 2)  # the smallest DCT scale keeping both sides >= that
            return pil(image.convert("RGB"))

    def torchvision_jpeg(data: bytes) -> torch.Tensor:
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return F.center_crop(F.resize(pixels, SIZE, interpolation=bicubic, antialias=True), SIZE)

    return {
        "PIL decode + bicubic": pil_full,
        "PIL draft + bicubic": pil_draft,
        "PIL draft to >= 2x + bicubic": lambda data: pil_draft(data, 2),
        "decode_jpeg + bicubic": torchvision_jpeg,
    }


CEILINGS = ("PIL decode + bicubic", "PIL draft + bicubic", "decode_jpeg + bicubic")  # 2x draft = PIL here


def _ceiling_worker(name: str, jpegs: list[bytes], barrier, results) -> None:  # noqa: ANN001
    import torch

    torch.set_num_threads(1)
    decode = decoders()[name]
    decode(jpegs[0])  # imports and first-call setup outside the timing
    barrier.wait()
    start, cpu = time.perf_counter(), time.process_time()
    for data in jpegs:
        decode(data)
    results.put((time.perf_counter() - start, time.process_time() - cpu))


def time_ceiling(name: str, jpegs: list[bytes]) -> Result:
    import multiprocessing

    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(WORKERS), context.Queue()
    processes = [
        context.Process(target=_ceiling_worker, args=(name, jpegs[i::WORKERS], barrier, results))
        for i in range(WORKERS)
    ]
    for process in processes:
        process.start()
    seconds, cpu = zip(*(results.get() for _ in processes))
    for process in processes:
        process.join()
    return Result(len(jpegs) / max(seconds), sum(cpu) / len(jpegs) * 1e3)


def quality(jpegs: list[bytes]) -> dict[str, tuple[float, float]]:
    """(min, median) PSNR in dB of each path against PIL's decode + bicubic resize + center crop."""
    from vlmtrain.data.transforms import TrainTransform, decode_image

    paths = {name: decode for name, decode in decoders().items() if name in CEILINGS}
    reference = [paths["PIL decode + bicubic"](data) for data in jpegs]
    fast = TrainTransform(SIZE)
    paths["vlmtrain train transform"] = lambda data: fast(decode_image({"jpg": data}))
    scores = {}
    for name, decode in paths.items():
        psnr = [_psnr(decode(data), ref) for data, ref in zip(jpegs, reference)]
        scores[name] = (min(psnr), statistics.median(psnr))
    return scores


def _psnr(image, reference) -> float:  # noqa: ANN001
    mse = (image.float() - reference.float()).pow(2).mean().item()
    return 99.0 if mse == 0 else 10 * __import__("math").log10(255**2 / mse)


def large_images(repeats: int) -> str:
    """One process, one thread: CPU ms per image (median, paths interleaved) and PSNR for each path
    on larger JPEGs, where `draft` can reduce in the DCT domain while keeping twice the target size."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from vlmtrain.data.transforms import TrainTransform, decode_image

    source, paths, fast = Image.fromarray(load_sample_images().images[0]), decoders(), TrainTransform(SIZE)
    paths["vlmtrain train transform"] = lambda data: fast(decode_image({"jpg": data}))
    lines = ["| image | KB | " + " | ".join(paths) + " |", "|---|---:|" + "---:|" * len(paths)]
    for width, height in ((640, 480), (1600, 1200), (2400, 1800), (3200, 2400)):
        noise = np.random.default_rng(0).normal(0, 3, (height, width, 3))
        image = Image.fromarray(
            (noise + source.resize((width, height), Image.BICUBIC)).clip(0, 255).astype("uint8")
        )
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        data, times = buffer.getvalue(), {name: [] for name in paths}
        reference = paths["PIL decode + bicubic"](data)
        for _ in range(repeats):
            for name, decode in paths.items():
                start = time.process_time()
                decode(data)
                times[name].append(time.process_time() - start)
        cells = [
            f"{statistics.median(times[name]) * 1e3:.1f} ms, {_psnr(paths[name](data), reference):.0f} dB"
            for name in paths
        ]
        lines.append(f"| {width}x{height} | {len(data) // 1000} | " + " | ".join(cells) + " |")
    return "\n".join(lines).replace(", 99 dB", ", exact")


# ---- open_clip's loader, run under its own venv --------------------------------------------------


def openclip_batches(pattern: str, count: int) -> Iterator[int]:
    """Sizes of the batches open_clip_train's webdataset loader yields, epoch after epoch."""
    from argparse import Namespace

    import open_clip
    from open_clip_train.data import get_wds_dataset

    args = Namespace(
        train_data=pattern, train_num_samples=count, batch_size=BATCH, workers=WORKERS, world_size=1,
        seed=0, dataset_resampled=False, train_data_upsampling_factors=None,
    )  # fmt: skip
    preprocess = open_clip.image_transform(SIZE, is_train=True)
    data = get_wds_dataset(
        args, preprocess, is_train=True, tokenizer=open_clip.SimpleTokenizer(context_length=77)
    )
    for epoch in range(1_000_000):
        data.set_epoch(epoch)
        for images, _ in data.dataloader:
            yield len(images)


def time_openclip(python: str, pattern: str, count: int, total: int) -> Result | None:
    command = [python, __file__, "--openclip-child", pattern, "--count", str(count), "--total", str(total)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        print(f"open_clip loader failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return Result(*json.loads(done.stdout.strip().splitlines()[-1]))


# ---- the comparison ------------------------------------------------------------------------------


def measure_all(args: argparse.Namespace, pattern: str, jpegs: list[bytes]) -> list[dict]:
    """One dict per repeat: each path's Result (None where it could not run), and the load average."""
    from vlmtrain.data.transforms import TrainTransform, image_transform

    pil = image_transform(SIZE, (0.0,) * 3, (1.0,) * 3, normalize=False)  # vlmtrain's previous transform
    total = args.epochs * args.count * 5 // 6  # open_clip's loader drops a partial batch per worker and epoch
    runs: dict[str, Callable[[], Result | None]] = {
        "vlmtrain stream": lambda: time_stream(
            lambda: vlmtrain_batches(pattern, TrainTransform(SIZE)), total
        ),
        "vlmtrain stream, PIL transform": lambda: time_stream(lambda: vlmtrain_batches(pattern, pil), total),
    }
    if args.openclip_python:
        runs["open_clip loader"] = lambda: time_openclip(args.openclip_python, pattern, args.count, total)
    for name in CEILINGS:
        runs[f"ceiling: {name}"] = lambda name=name: time_ceiling(name, jpegs)
    names, repeats = list(runs), []
    for repeat in range(args.repeats):
        results: dict = {"load": os.getloadavg()[0]}
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            results[name] = runs[name]()
            print(f"repeat {repeat}: {name}: {results[name]}", file=sys.stderr)
        repeats.append(results)
    return repeats


def table(repeats: list[dict], scores: dict[str, tuple[float, float]]) -> str:
    ceiling = "ceiling: decode_jpeg + bicubic"
    psnr_of = {
        "vlmtrain stream": "vlmtrain train transform",
        "vlmtrain stream, PIL transform": "PIL decode + bicubic",
    }
    lines = [
        "| path | samples/s (median) | per repeat | vs decode_jpeg ceiling | CPU ms/sample | PSNR vs PIL (dB), min / median |",
        "|---|---:|---|---:|---:|---|",
    ]
    for name in [key for key in repeats[0] if key != "load"]:
        done = [r for r in repeats if r[name]]
        if not done:
            continue
        rates = [r[name].samples_per_s for r in done]
        ratio = statistics.median(r[name].samples_per_s / r[ceiling].samples_per_s for r in done)
        cpu = statistics.median(r[name].cpu_ms_per_sample for r in done)
        score = scores.get(psnr_of.get(name, name.removeprefix("ceiling: ")))
        psnr = (
            "its own crop"
            if score is None
            else "exact"
            if score[0] >= 99
            else f"{score[0]:.1f} / {score[1]:.1f}"
        )
        per = " ".join(f"{rate:.0f}" for rate in rates)
        lines.append(
            f"| {name} | {statistics.median(rates):.0f} | {per} | {ratio:.2f}x | {cpu:.2f} | {psnr} |"
        )
    loads = " ".join(f"{r['load']:.1f}" for r in repeats)
    return "\n".join(lines) + f"\n\n1-minute load average at the start of each repeat: {loads}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "data_decode")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large", action="store_true", help="only the larger-image table")
    parser.add_argument("--json", type=Path, help="also write every repeat's results here")
    default_openclip = REPO / ".venv-openclip" / "bin" / "python"
    parser.add_argument(
        "--openclip-python", default=str(default_openclip) if default_openclip.exists() else None
    )
    parser.add_argument("--openclip-child", help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.openclip_child:
        print(json.dumps(time_stream(lambda: openclip_batches(args.openclip_child, args.count), args.total)))
        return
    import torch

    torch.set_num_threads(1)
    if args.large:
        print(large_images(max(5, args.repeats)))
        return
    pattern = make_photos(args.root, args.count)
    jpegs = read_jpegs(pattern)
    kb = sorted(len(data) / 1000 for data in jpegs)
    print(
        f"{len(jpegs)} JPEGs in {SHARDS} shards, {kb[0]:.0f}-{kb[-1]:.0f} KB (median {kb[len(kb) // 2]:.0f})"
    )
    scores = quality(jpegs[:300])
    repeats = measure_all(args, pattern, jpegs)
    print(table(repeats, scores))
    if args.json:
        args.json.write_text(json.dumps(repeats, indent=1))
    if not args.openclip_python:
        print("open_clip's loader not measured: no open_clip venv (bash benchmarks/openclip_env.sh)")


if __name__ == "__main__":
    main()
