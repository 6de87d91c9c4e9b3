"""The typed run config: the one source of defaults, types and per-field docs.

The dataclasses below are registered with Hydra's ConfigStore (`vlmtrain.configs` does it on import) as
the base of `train.yaml` and `eval.yaml`; the YAML under configs/ only selects and overrides. Components
built from a `_target_` (models, towers, losses, optimizers, schedules) take their schema from the
constructor's own signature (`target_schema`), so a wrong type or an unknown key fails at composition,
as one line naming the key (`one_line`).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

PRECISIONS = ("fp32", "bf16")
PARALLEL = ("ddp", "fsdp")
CLUSTERS = ("local", "slurm")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A config problem, as one line: '<key>: <what is wrong>'."""


@dataclass
class SyntheticSpec:
    """Generate the built-in synthetic dataset into `root` on first use."""

    root: str = "~/.cache/vlmtrain/synthetic"
    train_samples: int = 20000
    val_samples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least_one(self, "data.synthetic", ("train_samples", "val_samples"))


@dataclass
class SourceConfig:
    """One training source of `data.sources`: its shards and its share of the samples."""

    shards: str = MISSING  # like data.train_shards
    weight: float = 1.0  # samples are drawn from the sources in proportion to their weights

    def __post_init__(self) -> None:
        if not self.shards.strip():
            raise ConfigError("data.sources: a source's shards are empty")
        if not self.weight > 0:
            raise ConfigError(f"data.sources: a source's weight must be > 0, got {self.weight}")


@dataclass
class DataConfig:
    # '/data/train-{000000..000099}.tar', a directory, 'pipe:COMMAND', an http(s):// or fsspec URL
    # (s3://, gs://, ...) with a brace pattern, or several of these joined by '::' (one source); or
    # null with data.sources set instead
    train_shards: str | None = None
    sources: list[SourceConfig] | None = (
        None  # several sources mixed by weight: [{shards: .., weight: 3}, ..]
    )
    samples_per_epoch: int | None = None  # null: the shards' sample count from sizes.json
    resampled: bool = False  # draw each slot's shards with replacement (seeded): for very large sets
    max_bad_fraction: float = 0.05  # more bad (undecodable, captionless) samples than this stops the run
    record_keys: bool = False  # write each step's sample keys to run_dir/keys/rank{R}.jsonl (debugging)
    batch_size: int = 128  # per rank
    num_workers: int | str = (
        "auto"  # loader processes per rank; auto: the rank's share of the cores, at most 4
    )
    shuffle_buffer: int = 1000  # samples, still encoded
    random_crop_scale: list[float] | None = None  # [min, max] area of RandomResizedCrop; null: none
    val_shards: str | None = None  # retrieval shards (one or more captions per image, one per line)
    zeroshot_dir: str | None = None  # CLIP_benchmark-style folder: classnames.txt, templates, test/*.tar
    # More evaluation sets, each logged under its name (zeroshot/<name>/acc1, retrieval/<name>/...):
    zeroshot: dict[str, str] = field(default_factory=dict)  # name -> folder like zeroshot_dir
    retrieval: dict[str, str] = field(default_factory=dict)  # name -> shards like val_shards
    synthetic: SyntheticSpec | None = None  # write the built-in dataset on first use
    shard_retries: int = 3  # re-reads of a remote shard whose read fails; then it is skipped and logged
    retry_backoff_s: float = 1.0  # seconds before the first re-read; doubled before each next one
    # A resume whose shards differ from those its checkpoint read (list, sizes, first bytes; see
    # vlmtrain/data/fingerprint.py) is refused; true: log the differences and continue on the new shards
    allow_changed_shards: bool = False
    read_timeout_s: float = 60.0  # a remote read (http, pipe:, fsspec) waiting this long for a byte fails
    max_image_pixels: int = 8192 * 8192  # bigger images (from the header) are skipped, counted as `image`

    def __post_init__(self) -> None:
        _at_least_one(self, "data", ("batch_size", "max_image_pixels"))
        if not self.read_timeout_s > 0:
            raise ConfigError(f"data.read_timeout_s: must be > 0, got {self.read_timeout_s}")
        _at_least_zero(self, "data", ("shuffle_buffer", "shard_retries", "retry_backoff_s"))
        if self.num_workers != "auto" and not (isinstance(self.num_workers, int) and self.num_workers >= 0):
            raise ConfigError(f"data.num_workers: a count (>= 0) or auto, got {self.num_workers!r}")
        if self.train_shards is not None and self.sources is not None:
            raise ConfigError("data.sources: set either data.train_shards or data.sources, not both")
        if self.sources is not None and not self.sources:
            raise ConfigError(
                "data.sources: an empty list; name at least one source (or use data.train_shards)"
            )
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError(f"data.samples_per_epoch: must be >= 1, got {self.samples_per_epoch}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction}")
        for name in ("train_shards", "val_shards", "zeroshot_dir"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ConfigError(f"data.{name}: empty; name shards, a directory or a pattern (or null)")
        scale = self.random_crop_scale
        if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
            raise ConfigError(
                f"data.random_crop_scale: expected [min, max] with 0 < min <= max <= 1, got {scale}"
            )
        check_set_names(self.zeroshot, "data.zeroshot")
        check_set_names(self.retrieval, "data.retrieval")


@dataclass
class TrainerConfig:
    max_steps: int = 600
    grad_clip: float | None = 1.0  # max global grad norm; null: no clipping
    precision: str = "fp32"  # fp32 | bf16 (autocast; for GPUs)
    micro_batches: int = 1  # >1: accumulate over data.batch_size / micro_batches, all negatives kept
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile each tower's forward (in place: parameter names unchanged)
    log_every: int = 20  # steps between metrics lines
    checkpoint_every: int = (
        200  # steps between checkpoints (one is also written at the end and on a stop signal)
    )
    keep_checkpoints: int = 2  # the newest k are kept
    eval_every: int | None = None  # steps between evaluations; evaluation also runs once at the end
    eval_batch_size: int = 256
    plot_curves: bool = True  # rank 0 draws curves.png in the run folder after each evaluation
    wandb: bool = True  # offline unless WANDB_API_KEY is set
    wandb_project: str = "vlmtrain"
    max_skipped_steps: int = 20  # this many non-finite steps in a row stop the run
    gc_every: int = 50  # steps between garbage collections, at once on every rank; 0: Python's own timing
    # ddp: every rank holds the whole model, rank 0 writes step_N.pt; fsdp: each transformer block and the
    # model sharded over the ranks (weights, gradients, optimizer state), every rank writing its shards
    # into a step_N/ folder (vlmtrain/distributed/sharding.py, vlmtrain/checkpoint/sharded.py)
    parallel: str = "ddp"
    async_checkpoint: bool = False  # fsdp: write checkpoints in the background while the next steps run

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"trainer.parallel: expected one of {PARALLEL}, got {self.parallel!r}")
        if self.async_checkpoint and self.parallel != "fsdp":
            raise ConfigError(
                "trainer.async_checkpoint: needs trainer.parallel=fsdp (sharded checkpoints); under ddp rank 0 "
                "writes one file"
            )
        names = ("max_steps", "log_every", "checkpoint_every", "micro_batches", "max_skipped_steps")
        _at_least_one(self, "trainer", (*names, "keep_checkpoints", "eval_batch_size"))
        _at_least_zero(self, "trainer", ("gc_every",))
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"trainer.grad_clip: must be > 0 (or null: no clipping), got {self.grad_clip}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError(
                f"trainer.eval_every: must be >= 1 (or null: at the end only), got {self.eval_every}"
            )
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ConfigError(f"trainer.device: expected one of {DEVICES} or 'cuda:N', got {self.device!r}")
        if self.wandb and not self.wandb_project.strip():
            raise ConfigError("trainer.wandb_project: empty while trainer.wandb is true")


@dataclass
class ClusterConfig:
    """Where the run's processes live. `local`: this machine (one process, or what torchrun starts).
    `slurm`: `vlmtrain-train cluster=slurm` submits the run (`-m`: a sweep as one job array) and returns."""

    name: str = "local"  # local | slurm
    partition: str | None = None  # null: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None  # node features, e.g. 'h100'
    exclude: str | None = None  # nodes to avoid, e.g. 'gpu[03,07]'
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # null: one task per GPU (one task without GPUs)
    cpus_per_task: int = 4  # data loader workers + the training process
    mem_gb: float | None = None  # per node; null: the partition's default
    time_min: int | None = None  # the job's time limit in minutes
    signal_delay_s: int = 120  # SIGUSR2 this long before the limit: save, requeue, resume
    max_requeues: int = 5  # requeues after a stop signal, counted by SLURM_RESTART_COUNT
    array_parallelism: int = 64  # sweep points running at once
    setup: list[str] = field(default_factory=list)  # shell lines before the tasks start (modules, venv)
    additional_parameters: dict[str, Any] = field(
        default_factory=dict
    )  # more sbatch options, e.g. {mail-type: END}
    log_folder: str | None = None  # null: <run_dir>/slurm (a sweep: <sweep dir>/slurm)
    # options of the srun that starts the tasks; --kill-on-bad-exit: a task that fails (a crash, an
    # out-of-memory kill) ends the others at once instead of leaving them in a collective until it times out
    srun_args: list[str] = field(default_factory=lambda: ["--kill-on-bad-exit=1"])

    def __post_init__(self) -> None:
        if self.name not in CLUSTERS:
            raise ConfigError(f"cluster.name: expected one of {CLUSTERS}, got {self.name!r}")
        _at_least_one(self, "cluster", ("nodes", "cpus_per_task", "array_parallelism"))
        for key in ("gpus_per_node", "signal_delay_s", "max_requeues"):
            if getattr(self, key) < 0:
                raise ConfigError(f"cluster.{key}: must be >= 0, got {getattr(self, key)}")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ConfigError(f"cluster.tasks_per_node: must be >= 1, got {self.tasks_per_node}")
        if self.name == "slurm" and self.time_min is None:
            raise ConfigError(
                "cluster.time_min: required for cluster=slurm (the job's time limit in minutes)"
            )
        if self.time_min is not None and self.signal_delay_s >= self.time_min * 60:
            raise ConfigError(
                f"cluster.signal_delay_s: {self.signal_delay_s} s is not shorter than the time limit "
                f"(cluster.time_min={self.time_min})"
            )


@dataclass
class RunConfig:
    """vlmtrain-train: what `train.yaml` composes."""

    name: str = "${now:%Y%m%d-%H%M%S}"  # an experiment names its run; the same name resumes it
    run_dir: str = "runs/${name}"  # checkpoints, metrics.jsonl, eval.json
    seed: int = 0  # initial weights, data order, augmentation
    model: Any = MISSING
    loss: Any = MISSING
    optim: Any = MISSING
    schedule: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


@dataclass
class UnibenchConfig:
    """vlmtrain-eval with UniBench (the `unibench` extra): the eval's classification and relation sets,
    registered as UniBench benchmarks under their names, plus UniBench's own benchmarks by name."""

    enabled: bool = False
    benchmarks: list[str] = field(default_factory=list)  # UniBench's own, staged as benchmarks_dir/wds_<name>
    output_dir: str | None = None  # its feather files; default <eval out folder>/unibench
    benchmarks_dir: str = "~/.cache/unibench/data"  # where UniBench's own benchmarks are staged
    model_name: str | None = None  # default: the checkpoint's name (made a Python identifier)
    num_workers: int = 0  # data loader processes


@dataclass
class EvalConfig:
    """vlmtrain-eval: by default the datasets named in the run's own data config."""

    checkpoint: str = MISSING  # a run directory, checkpoint file or export folder
    zeroshot_dir: str | None = None
    val_shards: str | None = None
    # Named sets (+zeroshot.NAME=DIR, +retrieval.NAME=PATTERN) replace the run's own; none given: its own.
    zeroshot: dict[str, str] = field(default_factory=dict)
    retrieval: dict[str, str] = field(default_factory=dict)
    # +relation.NAME=SHARDS: image + .json {"caption": true caption, "negatives": [wrong captions]}
    relation: dict[str, str] = field(default_factory=dict)
    batch_size: int = 256
    llip_temperatures: list[float] = field(default_factory=lambda: [1, 3, 5, 8, 10])  # Llip: also each tau
    out: str | None = None  # results JSON; default <run_dir>/eval/<checkpoint name>.json
    per_sample: bool = False  # also <out stem>-samples/<set>.jsonl: key, predicted, correct per sample
    device: str = "auto"
    unibench: UnibenchConfig = field(default_factory=UnibenchConfig)


def check_set_names(sets: dict[str, str], key: str) -> None:
    """A set's name becomes a metric key's middle part: no '/', and not a Llip 'tau=' column."""
    for name in sets:
        if not name or "/" in name or name.startswith("tau="):
            raise ConfigError(f"{key}.{name}: a set name must be non-empty, without '/', not 'tau=...'")


def _at_least_one(config: object, prefix: str, names: Sequence[str]) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise ConfigError(f"{prefix}.{name}: must be >= 1, got {getattr(config, name)}")


def _at_least_zero(config: object, prefix: str, names: Sequence[str]) -> None:
    for name in names:
        if getattr(config, name) < 0:
            raise ConfigError(f"{prefix}.{name}: must be >= 0, got {getattr(config, name)}")


# Ranges of component values the trainer relies on, wherever a component takes them:
# (group, key, lowest, whether the lowest itself is allowed).
COMPONENT_RANGES = (
    ("optim", "lr", 0.0, False),
    ("optim", "weight_decay", 0.0, True),
    ("optim", "eps", 0.0, False),
    ("schedule", "warmup_steps", 0, True),
    ("schedule", "total_steps", 1, True),
)


def check_run(run: RunConfig) -> None:
    """What the field types and per-section checks cannot see: component ranges, how the sections fit
    together, and the machine (devices, run_dir). One line naming the key, before anything is created."""
    for group, key, lowest, inclusive in COMPONENT_RANGES:
        value = (getattr(run, group) or {}).get(key)
        if isinstance(value, int | float) and not (value >= lowest if inclusive else value > lowest):
            raise ConfigError(f"{group}.{key}: must be {'>=' if inclusive else '>'} {lowest}, got {value}")
    betas = (run.optim or {}).get("betas")
    if betas is not None and not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise ConfigError(f"optim.betas: expected two values in [0, 1), got {list(betas)}")
    if run.data.batch_size % run.trainer.micro_batches:
        raise ConfigError(
            f"trainer.micro_batches: {run.trainer.micro_batches} does not divide data.batch_size "
            f"{run.data.batch_size}"
        )
    if run.data.train_shards is None and run.data.sources is None:
        raise ConfigError("data.train_shards: not set; name the training shards (or set data.sources)")
    if not run.run_dir.strip():
        raise ConfigError("run_dir: empty")
    if Path(run.run_dir).expanduser().exists() and not Path(run.run_dir).expanduser().is_dir():
        raise ConfigError(f"run_dir: {run.run_dir} exists and is not a directory")
    if run.cluster.name == "local":  # a submitted run's devices are on the cluster's nodes
        _check_device(run.trainer.device)


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device: {device!r} requested but no GPU is visible (use auto or cpu)")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ConfigError(f"trainer.device: {device!r}: {torch.cuda.device_count()} GPU(s) visible")


_SCALARS = (int, float, bool, str)


def _field_type(hint: Any) -> Any:
    """The closest type OmegaConf validates: scalars, optional scalars, lists and dicts; Any otherwise."""
    if hint in _SCALARS:
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            inner = _field_type(rest[0])
            return Any if inner is Any else inner | None
        return Any
    if origin in (list, tuple, Sequence) and args and args[0] in _SCALARS:
        return list[args[0]]
    if origin is dict or hint is dict:
        return dict[str, Any]
    return Any


def target_schema(target: Callable, partial: bool = False, **values: Any) -> type:
    """A dataclass with `_target_` and a field per constructor parameter (its type and default), so that
    composing checks a component's config against the code that will build it. `values` set defaults
    the signature leaves open (e.g. `total_steps="${trainer.max_steps}"`)."""
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:
        hints = {}
    params = list(inspect.signature(target).parameters.values())
    if partial:  # the first argument (model, optimizer) is given when the trainer calls it
        params = params[1:]
    fields: list[tuple[str, Any, Any]] = [
        ("_target_", str, field(default=f"{target.__module__}.{target.__qualname__}"))
    ]
    if partial:
        fields.append(("_partial_", bool, field(default=True)))
    for p in params:
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = values.get(p.name, MISSING if p.default is p.empty else p.default)
        if isinstance(default, list | dict | tuple):
            default = field(default_factory=lambda d=default: list(d) if isinstance(d, tuple) else d)
        else:
            default = field(default=default)
        fields.append((p.name, _field_type(hints.get(p.name, Any)), default))
    return dataclasses.make_dataclass(f"{target.__name__}Config", fields)


# What a value that a chosen option needs, and has no default for, is: said instead of OmegaConf's
# "missing mandatory value".
NEEDED = {"model.text_encoder.path": "a Hugging Face model folder is needed for model/text_encoder=hf"}
NO_OPTION = re.compile(
    r"Could not find '(?P<choice>[^']+)'\s*Available options in '(?P<group>[^']+)':(?P<options>.*)", re.S
)


def one_line(message: str) -> str:
    """OmegaConf/Hydra errors span several lines of context; keep the message and the key it names, in
    the user's terms: `loss=clipp: no such option; loss has clip, llip, siglip`, `KEY: what to set`."""
    message = str(message).split("Config search path:")[0]  # Hydra's list of where it looked
    if found := NO_OPTION.search(message):
        group, options = found["group"], ", ".join(found["options"].split())
        return f"{group}={found['choice'].removeprefix(group + '/')}: no such option; {group} has {options}"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), "")
    if key and "missing mandatory value" in message:
        return f"{key}: {NEEDED.get(key, f'a value is needed: {key}=...')}"
    noise = ("full_key:", "object_type=", "reference_type=", "To append", "See https")
    text = " ".join(line for line in lines if not line.startswith(noise))
    return f"{key}: {text}" if key and not text.startswith(key) else text
