"""Trainer settings and the small counters that, with the checkpoint, say exactly where a run is."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vlmtrain.config import ConfigError

PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainerConfig:
    max_steps: int = 600
    grad_clip: float | None = 1.0
    precision: str = "fp32"
    micro_batches: int = 1  # >1: accumulate gradients over this many micro-batches, keeping all negatives
    device: str = "auto"
    log_every: int = 20
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int | None = None
    eval_batch_size: int = 256
    wandb: bool = True
    wandb_project: str = "vlmtrain"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision: expected one of {PRECISIONS}, got {self.precision!r}")
        for name in ("max_steps", "log_every", "checkpoint_every", "micro_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name}: must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already trained on (the data cursor)
    samples_seen: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
