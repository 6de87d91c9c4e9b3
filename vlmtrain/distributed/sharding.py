"""Sharded data parallelism (FSDP2): every rank holds 1/N of the weights, gradients and optimizer state.

`shard_model` applies `torch.distributed.fsdp.fully_shard` bottom-up, as FSDP2 expects: first to each
transformer block of every tower (one all-gather and one reduce-scatter per block, so only one block's
full weights exist at a time), then to the root, which takes every parameter left over (embeddings,
projections, final norms, a tower without blocks, the Llip head, the temperature and bias).

How the blocks are found, without naming model families: each direct child of the model holding
parameters is a tower; its blocks are the children of the container (`nn.ModuleList` or `nn.Sequential`)
inside it that holds two or more parameterised children all of one class and, among such containers,
the most parameters. That is open_clip's `transformer.resblocks`, timm's ViT `blocks`, a Hugging Face
encoder's `layer` / `layers`, and for convolutional trunks their stages. A tower without such a container
is sharded whole with the root.

The root keeps its gathered weights from its forward to the end of the backward
(`reshard_after_forward=False`): the losses read parameters the model returns (the temperature, the
bias, the Llip output projection) after the forward, and the Llip head is reached through methods other
than `forward`, which FSDP does not hook (for evaluation, see `gathered`).

With micro-batches (`train.accumulate`) gradients are reduced on the last micro-batch only, as under
DDP (`sync_gradients`): one reduce-scatter per step instead of one per micro-batch, the same sums in the
same order as DDP's all-reduce. The price: until the last micro-batch each rank holds its blocks' whole
gradients (fp32, the size of the model), not 1/N of them; reduce-scattering every micro-batch would keep
them sharded for N x micro-batches the gradient traffic.

A single process (world size 1) shards too, over a process group of its own (`sharding_group`): the same
code and the same checkpoint layout (the temperature as a 1-element vector, DTensor state) at 1 rank as
at N, so its checkpoints are those of any sharded run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

CONTAINERS = (nn.ModuleList, nn.Sequential)
SCALARS = "_sharded_scalars"  # the model attribute naming the parameters that were 0-d before sharding


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_block_list(module: nn.Module) -> bool:
    children = list(module.children())
    return (
        isinstance(module, CONTAINERS)
        and len(children) >= 2
        and len({type(c) for c in children}) == 1
        and all(_param_count(c) > 0 for c in children)
    )


def tower_blocks(tower: nn.Module) -> list[nn.Module]:
    """The tower's transformer blocks (or stages): see the module's docstring; [] if it has none."""
    lists = [m for m in tower.modules() if _is_block_list(m)]
    if not lists:
        return []
    return list(max(lists, key=_param_count).children())


def shardable_blocks(model: nn.Module) -> list[nn.Module]:
    """Every tower's blocks, in the order of the model's children."""
    towers = [child for child in model.children() if _param_count(child) > 0]
    return [block for tower in towers for block in tower_blocks(tower)]


def _scalars_to_vectors(model: nn.Module) -> None:
    """FSDP2 shards along the first dimension, so a 0-d parameter (the temperature, the bias) becomes a
    1-element vector; the losses broadcast it the same way. Their names are kept on the model, so that
    `full_state_dict` gives them back as scalars."""
    scalars = []
    for name, param in list(model.named_parameters()):
        if param.ndim == 0:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, attr, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
            scalars.append(name)
    setattr(model, SCALARS, tuple(scalars))


def _placement(ranks: int):
    """Shard along the first dimension, unless it is shorter than the number of ranks (Llip's per-token
    projections, 64 x width x embed, on 256 GPUs), which would leave most ranks holding padding and the
    rest a large slice: then along the longest dimension that splits evenly (FSDP pads only the first)."""

    def place(param: nn.Parameter) -> Shard:
        even = [dim for dim in range(1, param.ndim) if param.shape[dim] % ranks == 0]
        if param.shape[0] >= ranks or not even:
            return Shard(0)
        return Shard(max(even, key=lambda dim: param.shape[dim]))

    return place


def shard_model(model: nn.Module, *, mesh: DeviceMesh | None = None, mixed_precision: bool) -> nn.Module:
    """Shard `model` in place over `mesh` (default: every rank of the default group) and return it.

    `mixed_precision`: compute in bf16 with fp32 gradient reduction (for `trainer.precision=bf16` on
    CUDA); the sharded weights and optimizer state stay fp32 either way. Call before building the
    optimizer: its parameters are the sharded ones."""
    _scalars_to_vectors(model)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    ranks = mesh.size() if mesh is not None else torch.distributed.get_world_size()
    options = {
        "mesh": mesh,
        "mp_policy": policy if mixed_precision else MixedPrecisionPolicy(),
        "shard_placement_fn": _placement(ranks),
    }
    for block in shardable_blocks(model):
        fully_shard(block, **options)
    fully_shard(model, reshard_after_forward=False, **options)
    return model


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Within, the root's own weights are whole on every rank (a collective on entry), so that methods
    other than forward (`encode_image`, `encode_text`, Llip's `similarity` and its head) can run for
    evaluation; the blocks gather theirs as they run. Hooking those methods as forward methods instead
    would nest the root's hooks inside its forward, which calls them. A no-op when not sharded."""
    if not is_sharded(model):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's full value on every rank (a collective); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the CPU, shaped as the unsharded model's (scalars as scalars): what
    a DDP run's checkpoint or an export holds. Under sharding a collective, gathered one tensor at a time
    onto rank 0's CPU; the other ranks get {}."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {k: v.reshape(()) if k in getattr(model, SCALARS, ()) else v for k, v in state.items()}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], from_first: bool = False) -> None:
    """Load an unsharded model's state dict into a model, sharded or not: every rank passes the same, or
    (`from_first`, sharded) rank 0 alone passes it and the others `{}`, each rank receiving its shards."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    scalars = getattr(model, SCALARS, ())
    state = {k: v.reshape(1) if k in scalars else v for k, v in state.items()}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_first)
    set_model_state_dict(model, state, options=options)


def sharding_group(device: torch.device) -> bool:
    """A process group for sharding: the launcher's, else (one process) a 1-rank group of this process's
    own, made here; True when made here (the caller destroys it when done)."""
    if dist.is_initialized():
        return False
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def shard_for_training(model: nn.Module, device: torch.device, precision: str) -> bool:
    """`trainer.parallel=fsdp`: shard `model` in place over every rank (a 1-rank group of its own when
    alone), in bf16 compute with fp32 reduction only on CUDA with `trainer.precision=bf16`. True when the
    process group was made here (the caller destroys it when done). Before the optimizer is built."""
    made = sharding_group(device)
    shard_model(model, mixed_precision=device.type == "cuda" and precision == "bf16")
    return made


@contextmanager
def sync_gradients(model: nn.Module, sync: bool) -> Iterator[None]:
    """Within, a backward reduces gradients over the ranks only if `sync` (else they add up locally until
    a backward that does): DDP's `no_sync()`, FSDP's `set_requires_gradient_sync`; a model that is
    neither reduces nothing anyway."""
    if sync:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a sharded tensor; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
