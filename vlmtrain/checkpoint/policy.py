"""What a resumed run may change: the config a run is launched with again is compared with the one its
checkpoint was saved with. What shapes the weights, the optimisation or the data position (model, loss,
optimizer, schedule, seed, training data and sources, the shuffle buffer) must stay; the rest (run
length, logging, checkpoint and eval intervals, eval sets, device, precision, clipping, and the
parallelism: `trainer.parallel` ddp <-> fsdp loads one kind's checkpoint into the other, see
vlmtrain.checkpoint.kinds) is applied, and so are the model fields that change how much memory or work
a step takes but not what it computes (activation checkpointing: bit for bit; the text padding left
out: up to float rounding).

The world size and the data workers per rank may change: the data position is shared out over the new
slots (vlmtrain.data.reshard). The global batch (data.batch_size per rank x world size; micro-batches
split a rank's batch and leave it whole for the loss) is part of the optimisation and stays
(`resumed_batch`): on another world size the per-rank batch becomes the global batch over the new
world size, and trainer.micro_batches the fewest that keep each micro-batch no larger than the one the
run is launched with; a world size that does not divide the global batch, or a per-rank batch changed
to another global batch, is refused in one line naming both numbers.
"""

from __future__ import annotations

from typing import Any

from vlmtrain.dotted import flatten
from vlmtrain.schema import ConfigError

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
    "data.shuffle_buffer",
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


def resumed_batch(saved: dict[str, Any], new: dict[str, Any]) -> tuple[int, int]:
    """(data.batch_size, trainer.micro_batches) for a run launched with `new` that resumes from `saved`
    (each a config with its `world_size`): the saved global batch kept (see above), else ConfigError."""
    batch, ranks, micro = new["data"]["batch_size"], new["world_size"], new["trainer"]["micro_batches"]
    before, ranks_before = saved.get("data", {}).get("batch_size", batch), saved.get("world_size", ranks)
    kept = before * ranks_before
    if batch * ranks == kept:
        return batch, micro
    if batch != before:
        hint = f" (data.batch_size={kept // ranks})" if kept % ranks == 0 else ""
        raise ConfigError(
            f"data.batch_size: {batch} per rank x {ranks} rank(s) is a global batch of {batch * ranks}, the "
            f"checkpoint's is {kept} ({before} x {ranks_before}); the global batch cannot change when "
            f"resuming: restore it{hint} or start a new run_dir"
        )
    if kept % ranks:
        raise ConfigError(
            f"data.batch_size: the checkpoint's global batch {kept} ({before} per rank x {ranks_before} "
            f"rank(s)) does not divide over {ranks} ranks; resume on a world size that divides {kept}, or "
            "start a new run_dir"
        )
    per_rank, largest = kept // ranks, max(1, batch // micro)  # the micro-batch launched with
    return per_rank, next(m for m in range(1, per_rank + 1) if per_rank % m == 0 and per_rank // m <= largest)
