"""Composing configs and running short trainings the way `vlmtrain-train` does."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import vlmtrain.configs
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from vlmtrain.train.trainer import Trainer

CONFIG_DIR = Path(vlmtrain.configs.__file__).parent
SMALL_CONTEXT, TINY_CONTEXT = 20, 16  # tokens per caption: SMALL_MODEL's, TINY_TOWERS'
SMALL_MODEL = [
    "model.embed_dim=64",
    "model.image_encoder.vision_cfg.patch_size=16",
    "model.image_encoder.vision_cfg.width=64",
    "model.image_encoder.vision_cfg.layers=2",
    "model.text_encoder.text_cfg.width=64",
    "model.text_encoder.text_cfg.layers=2",
    f"model.text_encoder.context_length={SMALL_CONTEXT}",
    "trainer.wandb=false",
    "trainer.plot_curves=false",  # half a CPU second of drawing a run; drawn where a test reads it
]
# SMALL_MODEL's towers smaller still, where a test trains many runs on ranks: 32-pixel images, 16 tokens
TINY_TOWERS = [
    "model.image_encoder.vision_cfg.image_size=32",
    "model.image_encoder.vision_cfg.patch_size=8",
    f"model.text_encoder.context_length={TINY_CONTEXT}",
]
# The sigmoid losses start with the bias near -log(batch size), where the all-negative optimum lies; the
# paper's -10 suits 32k batches and would spend short runs moving the bias.
LOSSES = {
    "siglip": ["loss=siglip", "model.init_logit_bias=-4"],
    "llip": [
        "loss=llip",
        "model.init_logit_bias=-4",
        "model.image_encoder.mixture_tokens=8",
        "model.num_heads=4",
    ],
}


@contextmanager
def restored_logging() -> Iterator[None]:
    """Hydra's app configures the root logger; an in-process CLI run must not leave that to later tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_train(overrides: list[str]) -> DictConfig:
    with initialize_config_module("vlmtrain.configs", version_base="1.3"):
        return compose("train", overrides=overrides)


def data_overrides(root: Path) -> list[str]:
    return [
        "data.synthetic=null",
        f"data.train_shards={root / 'train'}",
        f"data.val_shards={root / 'val'}",
        f"data.zeroshot_dir={root / 'classification'}",
    ]


def config(root: Path, run_dir: Path, *overrides: str) -> DictConfig:
    """The small model on the synthetic shards under `root`, training in `run_dir`."""
    return compose_train([*data_overrides(root), *SMALL_MODEL, f"run_dir={run_dir}", *overrides])


def run_training(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, float]:
    with Trainer.from_config(cfg, run_dir) as trainer:
        return trainer.train()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def short_run(loss: str, synthetic_root: Path, run_dir: Path, *overrides: str) -> tuple[list[float], dict]:
    """300 steps with `loss` (clip, siglip or llip) on the small model: (logged losses, final eval)."""
    cfg = config(
        synthetic_root,
        run_dir,
        f"loss={loss}",
        *LOSSES.get(loss, []),
        "trainer.max_steps=300",
        "trainer.log_every=10",
        "data.batch_size=64",
        "optim.lr=2e-3",
        "schedule.warmup_steps=20",
        *overrides,
    )
    results = run_training(cfg)
    return [row["loss"] for row in read_metrics(run_dir) if "loss" in row], results


def assert_learned(losses: list[float], results: dict) -> None:
    """The loss fell and zero-shot beats 3x chance."""
    assert losses[-1] < losses[0] - 0.5, losses
    assert results["zeroshot/acc1"] > 3 / results["zeroshot/num_classes"], results


def assert_learns(loss: str, synthetic_root: Path, run_dir: Path, *overrides: str) -> None:
    """A `short_run` with `loss` learns."""
    assert_learned(*short_run(loss, synthetic_root, run_dir, *overrides))


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(main: Callable[[], object], argv: list[str], capsys: pytest.CaptureFixture) -> CliResult:
    """A console script's entry point (`cli.train`, `cli.evaluate`, ...) run in this process with
    `argv`, as its own process would run it: exit code (0 unless it exits), stdout and stderr."""
    saved_argv, code = sys.argv, 0
    capsys.readouterr()  # drop what came before
    sys.argv = [getattr(main, "__name__", "vlmtrain"), *argv]
    try:
        with restored_logging():
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved_argv
    out, err = capsys.readouterr()
    return CliResult(code, out, err)
