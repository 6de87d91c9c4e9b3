"""The local SLURM cluster of tests/slurm and the jobs its tests read, shared by its modules: every chain of
jobs starts as the session does, each in its own thread, so that the jobs run side by side; the runs
they are compared with train meanwhile, once for all of them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.shards import reshard
from tests.helpers.slurm import COMMON, REPO, STEPS, Chains, data_overrides
from tests.slurm import chains

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
    start: list[str]  # the command that (re)starts it: what a node that died needs to come back
    failures: str = ""  # why a cluster tried before it did not start


@pytest.fixture(scope="session")
def slurm():
    """The local cluster: started if not running (and stopped again then); skipped without SLURM."""
    if not shutil.which("slurmctld") or not shutil.which("sbatch"):
        pytest.skip("SLURM is not installed (apt-get install slurm-wlm munge)")
    failures = []  # why a cluster did not start: the reason a multi-node test is skipped
    for start, stop, variable, default in CLUSTERS:
        state = Path(os.environ.get(variable, default))
        os.environ["SLURM_CONF"] = str(state / "slurm.conf")
        start_command = ["bash", str(SCRIPTS / start[0]), *start[1:], str(state)]
        running = state.joinpath("slurm.conf").exists() and _ok(["scontrol", "ping"])
        started = running or subprocess.run(start_command, capture_output=True, text=True, timeout=120)
        if running or started.returncode == 0:
            break
        failures.append(f"{start[0]}: {(started.stderr.strip().splitlines() or ['no output'])[-1]}")
        subprocess.run(["bash", str(SCRIPTS / stop[0]), *stop[1:], str(state)], capture_output=True)
    else:
        pytest.fail(f"neither local SLURM cluster started (launch/local-slurm): {'; '.join(failures)}")
    nodes = len(set(_out(["sinfo", "-h", "-N", "-o", "%N"]).split()))
    yield Cluster(state, nodes, start_command, "; ".join(failures))
    if not running:
        subprocess.run(["bash", str(SCRIPTS / stop[0]), *stop[1:], str(state)], timeout=120)


def _ok(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True, timeout=120).returncode == 0


def _out(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture(scope="session")
def two_nodes(slurm):
    if slurm.nodes < 2:
        pytest.skip(f"the local cluster has one node (the two-node one did not start: {slurm.failures})")
    return slurm


@pytest.fixture(scope="session")
def slurm_data(synthetic_root, tmp_path_factory) -> Path:
    """The suite's synthetic training split in 4 shards, one for each rank of a 2 x 2 job (it has 3)."""
    root = tmp_path_factory.mktemp("slurm-data")
    reshard(synthetic_root / "train", root / "train", 4)
    return root


class References:
    """The uninterrupted runs of STEPS steps on 2 processes (and 4 on the two-node cluster; then 2 sharded,
    `2-fsdp`), as torchrun trains them here: started in a process of their own as the session starts,
    read once done."""

    def __init__(self, data: Path, out_dir: Path, worlds: list[str]) -> None:
        command = [
            sys.executable, "-m", "tests.helpers.reference", str(out_dir), *map(str, worlds), "--",
            *data_overrides(data), *(c for c in COMMON if not c.startswith("cluster.")), f"trainer.max_steps={STEPS}",
        ]  # fmt: skip
        self.out_dir, self.log = out_dir, out_dir / "reference.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def __call__(self, world: int | str) -> Path:
        assert self.process.wait(timeout=600) == 0, self.log.read_text()[-3000:]
        return self.out_dir / str(world)


@pytest.fixture(scope="session")
def references(slurm, slurm_data, tmp_path_factory):
    worlds = ["2", "4", "2-fsdp"] if slurm.nodes > 1 else ["2", "2-fsdp"]
    started = References(slurm_data, tmp_path_factory.mktemp("torchrun"), worlds)
    yield started
    if started.process.poll() is None:
        started.process.kill()


@pytest.fixture(scope="session")
def runs(slurm, slurm_data, references, tmp_path_factory) -> Chains:
    """Every chain of jobs (chains.py), started at once beside the reference runs."""
    started = Chains()
    chains.start_all(started, slurm, slurm_data, tmp_path_factory.mktemp("slurm-runs"))
    return started
