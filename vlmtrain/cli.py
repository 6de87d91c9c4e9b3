"""Entry points: vlmtrain-train, vlmtrain-eval (Hydra apps) and vlmtrain-data (dataset tools)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vlmtrain.config import ConfigError, check_loss_fits_model, check_targets, to_dataclass
from vlmtrain.data.shards import expand_shards
from vlmtrain.data.synthetic import ensure_synthetic, write_synthetic
from vlmtrain.data.webdataset import DataConfig
from vlmtrain.distributed.env import barrier, init_distributed
from vlmtrain.eval.suite import benchmark_records, format_results, run_evals
from vlmtrain.launch.preemption import RunStopped, StopRequest
from vlmtrain.train.state import TrainerConfig

log = logging.getLogger("vlmtrain")
COMPONENT_GROUPS = ("model", "loss", "optim", "schedule")


def _fail(error: Exception) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def prepare_data(data: DataConfig, is_main: bool) -> None:
    """Write the synthetic dataset on first use (rank 0), then check that every shard path exists."""
    if data.synthetic is not None:
        if is_main:
            ensure_synthetic(**vars(data.synthetic))
        barrier()
    expand_shards(data.train_shards, "data.train_shards")
    if data.val_shards:
        expand_shards(data.val_shards, "data.val_shards")
    if data.zeroshot_dir and not Path(data.zeroshot_dir).expanduser().is_dir():
        raise FileNotFoundError(f"data.zeroshot_dir: no such directory {data.zeroshot_dir}")


def build_run(cfg: DictConfig) -> dict[str, Any]:
    """Check the whole config, then build every component; any problem is one line naming its key."""
    trainer = to_dataclass(cfg.trainer, TrainerConfig, "trainer")
    data = to_dataclass(cfg.data, DataConfig, "data")
    if data.batch_size % trainer.micro_batches:
        raise ConfigError(
            f"trainer.micro_batches: {trainer.micro_batches} does not divide data.batch_size {data.batch_size}"
        )
    for group in COMPONENT_GROUPS:
        check_targets(cfg[group], group)
    env = init_distributed(trainer.device)
    prepare_data(data, env.is_main)
    torch.manual_seed(cfg.seed)  # the initial weights are a function of the seed
    components = {group: build(cfg[group], group) for group in COMPONENT_GROUPS}
    check_loss_fits_model(components["loss"], components["model"])
    return {"trainer": trainer, "data": data, **components}


def build(node: DictConfig, key: str) -> Any:
    """instantiate, with a constructor's own ValueError/FileNotFoundError surfaced as one line."""
    try:
        return instantiate(node)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ConfigError | FileNotFoundError):
            raise cause from None
        if isinstance(cause, ValueError | TypeError):
            message = str(cause)
            raise ConfigError(
                message if message.startswith(key) or "=" in message.split(":")[0] else f"{key}: {message}"
            ) from None
        raise


def run_training(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, float]:
    """Build everything `cfg` names and train in `run_dir` (default `cfg.run_dir`); return the final eval."""
    from vlmtrain.train.loop import train as train_loop

    run = build_run(cfg)
    run_dir = Path(run_dir or cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    stop = StopRequest()  # a signal saves at the next step boundary (RunStopped) instead of killing
    try:
        return train_loop(
            run["model"],
            run["loss"],
            run["optim"],
            run["schedule"],
            run["data"],
            run["trainer"],
            run_dir,
            cfg.seed,
            config,
            stop,
        )
    finally:
        stop.restore()


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> dict[str, float]:
    try:  # Hydra's output dir is run_dir itself, or run_dir/<job number> in a multirun sweep
        return run_training(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, FileNotFoundError) as error:
        _fail(error)
    except RunStopped as stopped:
        print(f"{stopped}: run the same command to resume", file=sys.stderr)
        sys.exit(stopped.exit_code)


def precheck_overrides(config_name: str, argv: list[str]) -> None:
    """Compose once before Hydra does, so a bad override is one line naming it (single runs only)."""
    if any(arg.startswith("-") for arg in argv):  # --help, --cfg, --multirun: Hydra's own business
        return
    overrides = [arg for arg in argv if not arg.startswith(("hydra.", "hydra/"))]
    try:
        with initialize_config_module("vlmtrain.configs", version_base="1.3"):
            compose(config_name, overrides=overrides)
    except Exception as error:
        cause = f"\n{error.__cause__}" if error.__cause__ else ""
        _fail(ConfigError(one_line(f"{error}{cause}")))


def quote_brace_patterns(argv: list[str]) -> list[str]:
    """Shard patterns like a/{000..009}.tar are not valid Hydra override syntax unquoted; quote them."""
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and "{" in value and "${" not in value and value[:1] not in "'\"[":
            arg = f"{key}={value!r}" if "'" not in value else f'{key}="{value}"'
        quoted.append(arg)
    return quoted


def one_line(message: str) -> str:
    noise = (
        "full_key:",
        "object_type=",
        "reference_type=",
        "To append",
        "See https",
        "Config search path",
        "provider=",
    )
    lines = [
        line.strip() for line in message.splitlines() if line.strip() and not line.strip().startswith(noise)
    ]
    return " ".join(lines)


def train() -> None:
    sys.argv[1:] = quote_brace_patterns(sys.argv[1:])
    precheck_overrides("train", sys.argv[1:])
    _train()


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def _evaluate(cfg: DictConfig) -> dict[str, float]:
    from vlmtrain.pretrained import open_pretrained

    try:
        loaded = open_pretrained(cfg.checkpoint)  # a checkpoint file, a run directory or an export folder
    except (FileNotFoundError, ValueError) as error:
        _fail(error)
    model, path, data = (
        loaded.model.to(init_distributed(cfg.device).device),
        loaded.source,
        loaded.data_config,
    )
    zeroshot_dir = cfg.zeroshot_dir or data.get("zeroshot_dir")
    val_shards = cfg.val_shards or data.get("val_shards")
    if not (zeroshot_dir or val_shards):
        _fail(ConfigError("zeroshot_dir / val_shards: nothing to evaluate on (an export names no datasets)"))
    results = run_evals(
        model,
        loaded.tokenizer,
        loaded.transform,
        zeroshot_dir,
        val_shards,
        cfg.batch_size,
        cfg.llip_temperatures,
    )
    records = benchmark_records(results, str(path), {"zeroshot": zeroshot_dir, "retrieval": val_shards})
    default_out = (
        path.parent / f"{path.name}-eval.json"
        if path.is_dir()
        else path.parent.parent / "eval" / f"{path.stem}.json"
    )
    out = Path(cfg.out) if cfg.out else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": str(path), "metrics": results, "results": records}, indent=1))
    print(f"{path}\n{format_results(results)}\nwritten to {out}")
    return results


def evaluate() -> None:
    sys.argv[1:] = quote_brace_patterns(sys.argv[1:])
    precheck_overrides("eval", sys.argv[1:])
    _evaluate()


def data(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vlmtrain-data", description="Dataset tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    synthetic = commands.add_parser("synthetic", help="write the built-in coloured-shapes dataset as shards")
    synthetic.add_argument("--out", required=True)
    synthetic.add_argument("--train-samples", type=int, default=20000)
    synthetic.add_argument("--val-samples", type=int, default=1000)
    synthetic.add_argument("--seed", type=int, default=0)
    shards = commands.add_parser("shards", help="captioned images -> training shards (img2dataset layout)")
    shards.add_argument("--images", required=True, help="folder of .jpg/.png/.webp, searched recursively")
    shards.add_argument("--captions", help="CSV/TSV of path + caption rows (default: IMAGE.txt files)")
    shards.add_argument("--image-column", default="path")
    shards.add_argument("--caption-column", default="caption")
    classes = commands.add_parser("classification", help="class folders (DIR/<class>/*.jpg) -> zero-shot set")
    classes.add_argument("--images", required=True)
    classes.add_argument("--templates", help="prompts with {c}, one per line (default: photo prompts)")
    digits = commands.add_parser("digits", help="scikit-learn's handwritten digits -> train/val/zero-shot")
    digits.add_argument("--copies", type=int, default=8, help="augmented copies of each training scan")
    digits.add_argument("--size", type=int, default=32, help="image side in pixels")
    digits.add_argument("--seed", type=int, default=0)
    for command in (shards, classes, digits):
        command.add_argument("--out", required=True)
        command.add_argument("--samples-per-shard", type=int, default=1000)
        command.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    if args.command == "synthetic":
        root = write_synthetic(args.out, args.train_samples, args.val_samples, args.seed)
        print(
            f"wrote {args.train_samples} train, {args.val_samples} val and {args.val_samples} classification samples to {root}"
        )
        return
    from vlmtrain.data import convert
    from vlmtrain.data.digits import write_digits

    common = {"samples_per_shard": args.samples_per_shard, "overwrite": args.overwrite}
    try:
        if args.command == "shards":
            columns = {"image_column": args.image_column, "caption_column": args.caption_column}
            report = convert.write_caption_shards(args.images, args.out, args.captions, **columns, **common)
            print(report.summary())
        elif args.command == "classification":
            print(convert.write_classification_set(args.images, args.out, args.templates, **common).summary())
        else:
            n = write_digits(args.out, args.copies, args.size, seed=args.seed, **common)
            print(f"wrote {n['train']} train samples and {n['held_out']} held-out digits to {args.out}")
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as error:
        _fail(error)


if __name__ == "__main__":
    train()
