"""Locked towers (LiT, "Locked-image Tuning", Zhai et al., 2022): a tower frozen wholly, or all but its
last N blocks. A frozen parameter has requires_grad=False, so the optimizer never holds it.

Norm layers follow open_clip: in a ViT (open_clip's towers) a norm trains with the block it belongs to;
in a Hugging Face text tower every LayerNorm stays frozen; in a timm CNN the frozen part's BatchNorm
statistics are frozen too (FrozenBatchNorm2d), so train mode no longer moves them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from vlmtrain.models import libraries

Trainable = nn.Module | nn.Parameter | None


def check_lock(name: str, locked: bool, unlocked_blocks: int, num_blocks: int) -> None:
    if unlocked_blocks < 0 or unlocked_blocks > num_blocks:
        raise ValueError(f"{name}.unlocked_blocks: expected 0..{num_blocks}, got {unlocked_blocks}")
    if unlocked_blocks and not locked:
        raise ValueError(f"{name}.unlocked_blocks: only means something with {name}.locked=true")


def lock(module: nn.Module, unlocked: Iterable[Trainable] = ()) -> None:
    """Freeze every parameter of `module`, then let the parameters of `unlocked` train again."""
    module.requires_grad_(False)
    for part in unlocked:
        if isinstance(part, nn.Parameter):
            part.requires_grad_(True)
        elif part is not None:
            part.requires_grad_(True)


def last_blocks(blocks: Sequence[nn.Module], count: int) -> list[nn.Module]:
    return list(blocks[len(blocks) - count :]) if count else []


def freeze_layer_norms(modules: Iterable[nn.Module]) -> None:
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.LayerNorm):
                sub.requires_grad_(False)


def lock_timm(trunk: nn.Module, unlocked_groups: int) -> None:
    """Freeze a timm model but its last `unlocked_groups` layer groups (timm's own grouping: stem, each
    block or stage, head), BatchNorm statistics of the frozen groups included."""
    from timm.models import group_modules, group_parameters

    freeze_batch_norm_2d = libraries.open_clip().utils.freeze_batch_norm_2d

    matcher = trunk.group_matcher()
    groups = group_parameters(trunk, matcher)
    last_frozen = max(groups) - unlocked_groups
    trunk.requires_grad_(True)
    for index in range(last_frozen + 1):
        for name in groups.get(index, ()):
            trunk.get_parameter(name).requires_grad_(False)
    frozen = {
        name for name, group in group_modules(trunk, matcher, reverse=True).items() if group <= last_frozen
    }
    freeze_batch_norm_2d(trunk, frozen)


def timm_groups(trunk: nn.Module) -> int:
    from timm.models import group_parameters

    return max(group_parameters(trunk, trunk.group_matcher())) + 1


def set_grad_checkpointing(module: nn.Module, enable: bool) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them (open_clip, timm
    and Hugging Face towers each expose their own switch)."""
    if not enable:
        return
    if hasattr(module, "set_grad_checkpointing"):
        module.set_grad_checkpointing(True)
    elif hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError(f"grad_checkpointing: {type(module).__name__} has no activation checkpointing")
