"""The uninterrupted reference runs that tests/slurm compares its jobs with, bit for bit:

    python -m tests.helpers.reference OUT_DIR WORLD[-PARALLEL] [...] -- OVERRIDES

trains `vlmtrain-train OVERRIDES run_dir=OUT_DIR/<WORLD[-PARALLEL]>` on WORLD local processes (with
`trainer.parallel=PARALLEL` where given: `2-fsdp`), as `torchrun
--standalone --nproc-per-node WORLD -m vlmtrain.cli` does: torchrun's own launcher (its arguments parsed
by torch.distributed.run, its elastic agent), with the workers forked from this process rather than
started as interpreters that import torch again (the bulk of a run this small)."""

from __future__ import annotations

import sys
import uuid


def _cli(*argv: str) -> None:
    """A worker: what `python -m vlmtrain.cli ARGV` runs, on one thread as each task of the jobs is
    (`cluster.cpus_per_task=1`): torchrun sets OMP_NUM_THREADS=1 for the interpreters it starts, but a
    worker forked from here keeps this process's thread count, and another count sums in another order."""
    import torch

    from vlmtrain import cli

    torch.set_num_threads(1)
    sys.argv = ["vlmtrain.cli", *argv]
    cli.train()


def train_on(world: int, overrides: list[str]) -> None:
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    args = parse_args(["--nproc-per-node", str(world), "--start-method", "fork", "-m", "vlmtrain.cli"])
    args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = (
        "c10d",
        "localhost:0",
        str(uuid.uuid4()),
    )  # --standalone
    config, _, _ = config_from_args(args)
    elastic_launch(config, entrypoint=_cli)(*overrides)


if __name__ == "__main__":
    import vlmtrain.cli  # noqa: F401  (imported once, before the workers fork)
    import vlmtrain.train.trainer  # noqa: F401

    split = sys.argv.index("--")
    out_dir, worlds, overrides = sys.argv[1], sys.argv[2:split], sys.argv[split + 1 :]
    for spec in worlds:
        world, _, parallel = spec.partition("-")
        sharded = [f"trainer.parallel={parallel}"] if parallel else []
        train_on(int(world), [*overrides, *sharded, f"run_dir={out_dir}/{spec}"])
