"""What seeing a run costs: the progress bar per step, and drawing curves.png (at each evaluation).

python benchmarks/visibility_overhead.py
"""

import io
import json
import tempfile
import time
from pathlib import Path

from vlmtrain.report.plots import write_run_plot
from vlmtrain.train.progress import Progress

STEPS = 100_000


def fake_run(folder: Path) -> None:
    """600 steps logged every 10, an evaluation (zero-shot + retrieval) every 100."""
    rows = []
    for step in range(10, 610, 10):
        train = ("loss", "lr", "logit_scale", "logit_bias", "grad_norm", "data_wait", "samples_per_s")
        rows.append({"step": step, **{k: 1.0 / step for k in train}})
        if step % 100 == 0:
            evals = ["acc1", "acc5", "mean_per_class_recall"]
            rows.append({"step": step, **{f"zeroshot/{k}": 0.5 for k in evals}})
            rows[-1] |= {
                f"retrieval/{d}_retrieval_recall@{k}": 0.1 for d in ("image", "text") for k in (1, 5, 10)
            }
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    bar = Progress(0, STEPS, bar=True, stream=io.StringIO())
    start = time.perf_counter()
    for _ in range(STEPS):
        bar.advance()
    per_step = (time.perf_counter() - start) / STEPS
    bar.close()
    with tempfile.TemporaryDirectory() as folder:
        fake_run(Path(folder))
        write_run_plot(Path(folder))  # the first draw also loads fonts
        times = []
        for _ in range(3):
            start = time.perf_counter()
            write_run_plot(Path(folder))
            times.append(time.perf_counter() - start)
    print("| what | time |\n|---|---|")
    print(f"| progress bar, per step | {per_step * 1e6:.1f} us |")
    print(f"| curves.png, 16 panels (best of 3) | {min(times):.2f} s |")


if __name__ == "__main__":
    main()
