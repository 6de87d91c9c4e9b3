"""What a resumed run may change: the config a run is launched with again is compared with the one its
checkpoint was saved with. What shapes the weights, the optimisation or the data position (model, loss,
optimizer, schedule, seed, training data and sources, per-rank batch and world size) must stay; the
rest (run length, logging, checkpoint and eval intervals, eval sets, device, precision, clipping) is
applied, and so are the model fields that change how much memory or work a step takes but not what it
computes (activation checkpointing: bit for bit; the text padding left out: up to float rounding). The data workers per rank must stay too
(the data position is a cursor per worker); 0 and 1 are alike (one reader either way, in the main
process or in one worker).
"""

from __future__ import annotations

from typing import Any

from vlmtrain.dotted import flatten

FIXED = (
    "seed",
    "model",
    "loss",
    "optim",
    "schedule",
    "data.train_shards",
    "data.sources",
    "data.resampled",
    "data.synthetic",
    "data.batch_size",
    "data.shuffle_buffer",
    "data.num_workers",
    "world_size",
)
FOLLOWS_APPLIED = ("schedule.total_steps",)  # set from trainer.max_steps, so it changes with it
SAME_RESULT = (  # inside `model`, but the same computation either way (see above)
    "model.image_encoder.grad_checkpointing",
    "model.text_encoder.grad_checkpointing",
    "model.text_encoder.trim_padding",
)


def _fixed(key: str) -> bool:
    if key in FOLLOWS_APPLIED or key in SAME_RESULT:
        return False
    return any(key == fixed or key.startswith(fixed + ".") for fixed in FIXED)


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The keys whose value differs between `saved` and `new`: (refused, applied), each sorted."""
    old, now = flatten(saved), flatten(new)
    changed = sorted(k for k in old.keys() | now.keys() if _normal(k, old.get(k)) != _normal(k, now.get(k)))
    return _collapse([k for k in changed if _fixed(k)]), [k for k in changed if not _fixed(k)]


def _collapse(keys: list[str]) -> list[str]:
    """A component whose `_target_` changed is named once ("loss"), not by each of its fields."""
    swapped = [k.removesuffix("._target_") for k in keys if k.endswith("._target_")]
    inside = lambda k: any(k.startswith(node + ".") for node in swapped)  # noqa: E731
    return sorted({k for k in keys if not inside(k)} | set(swapped))


def _normal(key: str, value: Any) -> Any:
    """Lists and tuples compare alike (a checkpoint may hold either); so do 0 and 1 data workers."""
    if key == "data.num_workers" and isinstance(value, int):
        return max(1, value)
    return list(value) if isinstance(value, tuple) else value


def describe(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
