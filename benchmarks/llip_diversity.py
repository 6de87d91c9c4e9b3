"""Does Llip model caption diversity better than one image vector? Multi-object recall of SigLIP and of
Llip variants trained alike (towers, data, steps, optimizer, seed) on `vlmtrain.datasets.multi_object`
(coloured shapes; `--task colour-pairs`: `vlmtrain.datasets.colour_pairs`, two-coloured objects).

Each variant trains through the real Trainer (the `train` config with the overrides below), is loaded
back with `load_pretrained` and scored with `vlmtrain.eval.multi_object.multi_object_recall` at the
model's own mixing temperature and at each of `--taus` (Llip only). One variant at a time, in this process.
Each setting trains in its own folder under `--runs` (named by the variant and a digest of its overrides):
the same command again scores the finished run without training it again.
The first line printed is the set's chance recall, the recall of a model that sees colours only (on the
colour pairs: which colours, not which go together) and, up to 8 classes, the best recall one image vector
can reach in a 2-dim embedding (`planar_ceiling`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llip_diversity.py             # the table in BENCHMARKS.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llip_diversity.py --variants siglip "llip default" --steps 800
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llip_diversity.py --data /tmp/mo-cross --shapes square cross
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llip_diversity.py --data /tmp/mo-colours --shapes circle \
        --variants siglip "llip default" --extra model.embed_dim=2 --llip-extra model.num_heads=1
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llip_diversity.py --task colour-pairs --data /tmp/mo-pairs \
        --variants siglip "llip default" --steps 500 --lr 1e-3 --warmup 100 \
        --llip-extra model.image_encoder.mixture_tokens=16
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import re
import time
from pathlib import Path
from typing import Any

TOWERS = {  # 16 patches of a 64 px image, 20 text tokens
    "quickstart": ["model/image_encoder=openclip_vit_micro_p16"],  # a 4-layer ViT, a 3-layer text tower
    "small": [  # both of width 64 and 2 layers (the suite's learning tests)
        "model.embed_dim=64",
        "model/image_encoder=openclip_vit_micro_p16",
        "model.image_encoder.vision_cfg.width=64",
        "model.image_encoder.vision_cfg.layers=2",
        "model.text_encoder.text_cfg.width=64",
        "model.text_encoder.text_cfg.layers=2",
    ],
}
COMMON = [
    "model.text_encoder.context_length=20",
    "trainer.wandb=false",
    "data.num_workers=1",
    "data.val_shards=null",
    "data.zeroshot_dir=null",
    "data.synthetic=null",
]
SIGMOID = ["model.init_logit_bias=-4"]  # near -log(batch): where the all-negative optimum lies
LLIP = ["loss=llip", *SIGMOID]  # K=64 mixture tokens, 8 heads: the model config's
PUBLISHED = [  # as the paper's configs, whatever the model config's defaults
    "model.query_from=pooled",
    "model.image_encoder.mixture_layout=replace_class",
    "model.qkv_norm=false",
    f"model.init_logit_scale={math.log(1 / 0.07)}",
    "model.temperature=5",
]


def _published(*changes: str) -> list[str]:
    return [*LLIP, *PUBLISHED, *changes]


VARIANTS: dict[str, list[str]] = {
    "siglip": ["loss=siglip", *SIGMOID],
    "clip": ["loss=clip"],
    "llip published": _published(),
    "query from embedding": _published("model.query_from=embedding"),
    "tokens appended": _published("model.image_encoder.mixture_layout=append"),
    "q/k/v norm": _published("model.qkv_norm=true"),
    "logit scale log 10": _published(f"model.init_logit_scale={math.log(10)}"),
    "tau 1": _published("model.temperature=1"),
    "earlier (all three)": _published(
        "model.query_from=embedding",
        "model.image_encoder.mixture_layout=append",
        f"model.init_logit_scale={math.log(10)}",
    ),
    "llip default": LLIP,  # whatever configs/model/llip.yaml selects
}


def planar_ceiling(root: Path) -> float | None:
    """The best multi-object recall of one image vector against unit class vectors in 2 dimensions: its
    top-k classes are k neighbours on the circle, so the best circular order of the classes bounds every
    such model (None beyond 8 classes: too many orders to try)."""
    from vlmtrain.data.shards import expand_shards, read_shard
    from vlmtrain.eval.zeroshot import read_task

    count = len(read_task(root)[0])
    if count > 8:
        return None
    images = [
        set(json.loads(raw["json"])["classes"])
        for shard in expand_shards(str(root / "test"), "multi-object test shards")
        for raw in read_shard(shard, on_error=lambda exc: False)
    ]
    k = len(images[0])

    def found(order: tuple[int, ...]) -> int:  # each image's best arc of k neighbours
        arcs = [set((order * 2)[start : start + k]) for start in range(count)]
        return sum(max(len(arc & objects) for arc in arcs) for objects in images)

    orders = ((0, *rest) for rest in itertools.permutations(range(1, count)))  # the first class fixed
    return max(map(found, orders)) / (k * len(images))


def compose_config(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_module

    with initialize_config_module("vlmtrain.configs", version_base="1.3"):
        return compose("train", overrides=overrides)


def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from vlmtrain.checkpoint.load import load_pretrained
    from vlmtrain.eval.multi_object import multi_object_recall, prompt_cosine, same_colour_pair_accuracy
    from vlmtrain.models.llip_model import LlipModel
    from vlmtrain.train.trainer import Trainer

    overrides = [
        *TOWERS[args.towers],
        *COMMON,
        f"data.train_shards={args.data / 'train'}",
        f"seed={args.seed}",
        f"trainer.max_steps={args.steps}",
        f"trainer.log_every={max(1, args.steps // 10)}",
        f"trainer.checkpoint_every={args.steps}",
        f"data.batch_size={args.batch}",
        f"optim.lr={args.lr}",
        f"schedule.warmup_steps={args.warmup}",
        *VARIANTS[name],
        *args.extra,
        *(args.llip_extra if "loss=llip" in VARIANTS[name] else []),
    ]
    # a folder per setting (data included): a run never resumes the checkpoint of other settings
    digest = hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:8]
    run_dir = args.runs / (re.sub(r"\W+", "_", name).strip("_") + f"-{digest}")
    overrides.append(f"run_dir={run_dir}")
    start = time.perf_counter()
    with Trainer.from_config(compose_config(overrides), run_dir) as trainer:
        trainer.train()
    seconds = time.perf_counter() - start
    model, transform, tokenizer = load_pretrained(run_dir)
    losses = [json.loads(line).get("loss") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in losses if x is not None]
    taus = [None, *args.taus] if isinstance(model, LlipModel) else [None]
    recall = {
        str(tau): multi_object_recall(model, tokenizer, transform, args.data, temperature=tau) for tau in taus
    }
    return {
        "variant": name,
        "recall": recall,
        "shape_pairs": (
            same_colour_pair_accuracy(model, tokenizer, transform, args.data)
            if args.task == "shapes"
            else None
        ),
        "prompt_cosine": prompt_cosine(model, tokenizer, args.data),
        "final_loss": losses[-1],
        "train_s": round(seconds, 1),
    }


def write_data(args: argparse.Namespace) -> tuple[float, str]:
    """Write the task's set under --data unless the one there was written with these settings: (chance
    recall, the recall of a model that sees colours only)."""
    from vlmtrain.datasets.colour_pairs import CLASSES as PAIRS
    from vlmtrain.datasets.colour_pairs import write_colour_pairs
    from vlmtrain.datasets.multi_object import write_multi_object
    from vlmtrain.eval.multi_object import bag_of_colours_recall, colour_only_recall

    sizes = {"train_samples": args.train_samples, "test_samples": args.test_samples}
    if args.task == "colour-pairs":
        info = {**sizes, "objects": args.objects, "task": "colour pairs", "seed": 0}
    else:
        info = {**sizes, "objects": args.objects, "shapes": args.shapes, "seed": 0}
    found = args.data / "info.json"
    if not found.exists() or json.loads(found.read_text()) != info:
        if args.task == "colour-pairs":
            write_colour_pairs(args.data, **sizes, objects=args.objects)
        else:
            write_multi_object(args.data, **sizes, objects=args.objects, shapes=args.shapes)
    if args.task == "colour-pairs":
        return args.objects / len(PAIRS), f"colours only {bag_of_colours_recall(args.data):.3f}"
    return args.objects / (5 * len(args.shapes)), f"colours only {colour_only_recall(args.data):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME"
    )
    parser.add_argument("--task", choices=["shapes", "colour-pairs"], default="shapes")
    parser.add_argument("--data", type=Path, default=Path("/tmp/vlmtrain-multi-object"))
    parser.add_argument("--runs", type=Path, default=Path("runs/llip_diversity"))
    parser.add_argument("--train-samples", type=int, default=3000)
    parser.add_argument("--test-samples", type=int, default=300)
    parser.add_argument("--objects", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=["circle", "square"], help="the classes' shapes")
    parser.add_argument("--towers", choices=list(TOWERS), default="small")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--taus", type=float, nargs="*", default=[1.0, 3.0, 10.0])
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every variant")
    parser.add_argument("--llip-extra", nargs="*", default=[], help="overrides for the Llip variants only")
    parser.add_argument("--json", type=Path, help="append one line per variant here")
    args = parser.parse_args()

    chance, reference = write_data(args)
    ceiling = planar_ceiling(args.data)
    print(
        f"chance {chance:.3f}, {reference}"
        + ("" if ceiling is None else f", one vector in 2 dims at most {ceiling:.3f}")
    )
    print(
        f"| variant | recall (own tau) | recall at tau {args.taus} | shape pairs | prompt cosine | final loss "
        "| train s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for name in args.variants:
        row = run_variant(name, args)
        own = row["recall"].pop("None")
        swept = " / ".join(f"{v:.3f}" for v in row["recall"].values())
        pairs = "" if row["shape_pairs"] is None else f"{row['shape_pairs']:.3f}"
        diagnostics = f"{pairs} | {row['prompt_cosine']:.3f}"
        print(
            f"| {name} | {own:.3f} | {swept} | {diagnostics} | {row['final_loss']:.2f} | {row['train_s']} |",
            flush=True,
        )
        if args.json:
            with args.json.open("a") as sink:
                sink.write(json.dumps({**row, "own": own, "args": vars(args)}, default=str) + "\n")


if __name__ == "__main__":
    main()
