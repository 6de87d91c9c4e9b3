"""What a resume costs the data stream: time from restoring the loader's state to its first batch, at 10%,
50% and 90% of a long epoch (20,000 synthetic samples, batch 32, 2 workers, shuffle buffer 1000). The
cursor re-reads only the current shards and the shards its shuffle buffer points into; a uniform
buffer of B samples reaches back about B x ln(B) samples, so the cost grows until a slot has read that
many and stays flat after, however far into the epoch.

python benchmarks/data_resume.py [--repeats 3] [--shuffle-buffer 1000]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlmtrain.data.loader import TrainLoader
from vlmtrain.data.transforms import image_transform
from vlmtrain.datasets.synthetic import write_synthetic
from vlmtrain.schema import DataConfig

SAMPLES, BATCH = 20_000, 32


def loader(root: Path, buffer: int = 1000) -> TrainLoader:
    config = DataConfig(
        train_shards=str(root / "train"), batch_size=BATCH, num_workers=2, shuffle_buffer=buffer
    )
    transform = image_transform(64, (0.5,) * 3, (0.5,) * 3, normalize=False)
    return TrainLoader(config, transform, lambda texts: torch.zeros(len(texts), 1), seed=0)


def states_at(root: Path, positions: list[int], buffer: int) -> dict[int, dict]:
    """The loader's state after each position (batches handed out), from one uninterrupted pass."""
    running, states = loader(root, buffer), {}
    batches = iter(running)
    for position in range(1, max(positions) + 1):
        next(batches)
        if position in positions:
            states[position] = running.state_dict()
    return states


def first_batch_seconds(root: Path, state: dict | None, buffer: int) -> float:
    start = time.perf_counter()
    resumed = loader(root, buffer)
    if state is not None:
        resumed.load_state_dict(state)
    next(iter(resumed))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    args = parser.parse_args()
    repeats, buffer = args.repeats, args.shuffle_buffer
    with tempfile.TemporaryDirectory() as folder:
        root = write_synthetic(Path(folder) / "synthetic", train_samples=SAMPLES, val_samples=10, seed=0)
        per_epoch = loader(root, buffer).steps_per_epoch
        positions = [per_epoch // 10, per_epoch // 2, per_epoch * 9 // 10]
        states = states_at(root, positions, buffer)
        times: dict[str, list[float]] = {"start": [], **{str(p): [] for p in positions}}
        for _ in range(repeats):  # interleaved, so a busy moment of the machine hits every position
            times["start"].append(first_batch_seconds(root, None, buffer))
            for position in positions:
                times[str(position)].append(first_batch_seconds(root, states[position], buffer))
    start = statistics.median(times["start"])
    print(
        f"{SAMPLES} samples, batch {BATCH}, buffer {buffer}, {per_epoch} steps/epoch, median of {repeats}\n"
    )
    print("| resumed at | time to first batch | runs | vs a fresh start |\n|---|---|---|---|")
    for name, values in times.items():
        label = "a fresh start" if name == "start" else f"batch {name} ({int(name) / per_epoch:.0%})"
        runs = " / ".join(f"{v:.2f}" for v in values)
        print(
            f"| {label} | {statistics.median(values):.2f} s | {runs} | {statistics.median(values) / start:.2f}x |"
        )
    early, middle, late = (statistics.median(times[str(p)]) for p in positions)
    print(f"\n90% vs 10%: {late / early:.2f}x, 90% vs 50%: {late / middle:.2f}x")


if __name__ == "__main__":
    main()
