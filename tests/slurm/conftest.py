"""The local SLURM cluster of tests/slurm and the jobs its tests read, shared by its modules: every job is
submitted before any test waits, so that they run side by side."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.runs import data_overrides
from tests.helpers.slurm import (
    COMMON,
    KILLED_STEPS,
    LONG,
    REPO,
    STEPS,
    cut_time_limit,
    interrupt,
    job_ids,
    kill_rank,
    launch,
    launch_command,
    signal_at_start,
)

SCRIPTS = REPO / "launch" / "local-slurm"
# (start, stop, state directory): the two-node cluster; where no network namespace can be made, the
# single-node one (the multi-node tests are then skipped)
CLUSTERS = [
    (["two-nodes.sh", "start"], ["two-nodes.sh", "stop"], "VLMTRAIN_SLURM_2N_DIR", "/tmp/vlmtrain-slurm-2n"),
    (["start.sh"], ["stop.sh"], "VLMTRAIN_SLURM_DIR", "/tmp/vlmtrain-slurm"),
]


@dataclass
class Cluster:
    state: Path
    nodes: int


@pytest.fixture(scope="session")
def slurm():
    """The local cluster: started if not running (and stopped again then); skipped without SLURM."""
    if not shutil.which("slurmctld") or not shutil.which("sbatch"):
        pytest.skip("SLURM is not installed (apt-get install slurm-wlm munge)")
    for start, stop, variable, default in CLUSTERS:
        state = Path(os.environ.get(variable, default))
        os.environ["SLURM_CONF"] = str(state / "slurm.conf")
        running = state.joinpath("slurm.conf").exists() and _ok(["scontrol", "ping"])
        if running or _ok(["bash", str(SCRIPTS / start[0]), *start[1:], str(state)]):
            break
        subprocess.run(["bash", str(SCRIPTS / stop[0]), *stop[1:], str(state)], capture_output=True)
    else:
        pytest.fail("neither local SLURM cluster started (launch/local-slurm)")
    nodes = len(set(_out(["sinfo", "-h", "-N", "-o", "%N"]).split()))
    yield Cluster(state, nodes)
    if not running:
        subprocess.run(["bash", str(SCRIPTS / stop[0]), *stop[1:], str(state)], timeout=120)


def _ok(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True, timeout=120).returncode == 0


def _out(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture(scope="session")
def two_nodes(slurm):
    if slurm.nodes < 2:
        pytest.skip("the local cluster has one node (no network namespaces here)")
    return slurm


@pytest.fixture(scope="session")
def early_usr2(slurm, synthetic_root, tmp_path_factory):
    """A 2-task job sent USR2 one second after it starts: its own fixture, so that it runs alone with
    `-k startup` (the `jobs` fixture submits it first when the whole suite runs)."""
    run_dir = tmp_path_factory.mktemp("slurm-early") / "run"
    result, ids = launch(synthetic_root, run_dir, "cluster.tasks_per_node=2", f"trainer.max_steps={STEPS}")
    assert result.returncode == 0 and len(ids) == 1, result.stderr
    signal_at_start(ids[0])
    return run_dir, ids[0]


SWEEP = ["trainer.max_steps=3", "optim.lr=1e-3,2e-3", "seed=0,1"]  # with -m


@pytest.fixture(scope="session")
def jobs(slurm, early_usr2, synthetic_root, tmp_path_factory):
    """Every job (the sweep's array too), submitted before any test waits (they share the cluster's
    slots), each with a watcher that interrupts it as soon as it has trained a few steps. One submission
    at a time, each watcher started right after its job's: a short job's few steps are not raced by
    other submissions starting up."""
    root = tmp_path_factory.mktemp("slurm-runs")
    two_tasks = ["cluster.tasks_per_node=2", f"trainer.max_steps={STEPS}"]
    two_nodes = ["cluster.nodes=2", "cluster.tasks_per_node=1"]
    rank_1_exits = root / "rank-1-exits"  # on the tasks' PYTHONPATH: rank 1 exits as Python starts
    rank_1_exits.mkdir()
    (rank_1_exits / "sitecustomize.py").write_text(
        'import os\nif os.environ.get("SLURM_PROCID") == "1":\n    os._exit(3)\n'
    )
    usr2, term = ("scancel", "--signal=USR2", "JOB"), ("scancel", "JOB")
    # two ranks sent USR2 at step 5: one on each node where there are two (a USR2 at startup: early_usr2)
    preempted = [*two_nodes, f"trainer.max_steps={STEPS}"] if slurm.nodes > 1 else two_tasks
    multi_node = [
        (
            "node_rank_killed",
            [*two_nodes, f"trainer.max_steps={KILLED_STEPS}", "trainer.checkpoint_every=5"],
            lambda run, job: kill_rank(run, job, 8, rank=1),
        ),
    ]
    submitted = {}
    for name, overrides, watch in [  # the longest chain (the time limit) first
        ("time_limit", [f"trainer.max_steps={LONG}", "cluster.signal_delay_s=45"], cut_time_limit),
        *(multi_node if slurm.nodes > 1 else []),
        ("plain", two_tasks, None),
        ("preempted", preempted, lambda run, job: interrupt(run, job, 5, *usr2)),
        ("cancelled", [f"trainer.max_steps={STEPS}"], lambda run, job: interrupt(run, job, 3, *term)),
        (
            "exhausted",
            ["trainer.max_steps=3000", "cluster.max_requeues=0"],
            lambda run, job: interrupt(run, job, 2, *usr2),
        ),
        ("one_task_fails", [*two_tasks, f'cluster.setup=["export PYTHONPATH={rank_1_exits}"]'], None),
        ("sweep", SWEEP, None),
    ]:
        command = launch_command(synthetic_root, root / name, *overrides)
        if name == "sweep":  # Hydra's -m comes before the overrides
            command.insert(1, "-m")
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        ids = job_ids(result.stdout)
        (root / f"{name}.submitted").write_text(result.stdout + result.stderr)  # what the command printed
        assert result.returncode == 0 and len(ids) == (4 if name == "sweep" else 1), result.stderr
        submitted[name] = (root / name, ids if name == "sweep" else ids[0], overrides)
        if watch:
            watch(root / name, ids[0])
    return submitted


@pytest.fixture(scope="session")
def torchrun_reference(synthetic_root, tmp_path_factory):
    """The runs of STEPS steps on two processes, uninterrupted, as torchrun trains them here."""
    run_dir = tmp_path_factory.mktemp("torchrun")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        "-m", "vlmtrain.cli", *data_overrides(synthetic_root), *COMMON, f"trainer.max_steps={STEPS}",
        f"run_dir={run_dir}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir
