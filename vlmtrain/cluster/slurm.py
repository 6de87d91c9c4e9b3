"""Running on SLURM: a run (or every point of a sweep, as one job array) submitted through submitit, and
the job each task runs.

At submission the run's config is resolved once (its `${now:}` name and an absolute `run_dir` pinned)
and written to `run_dir/config.yaml`; the job reads that file and the run's latest checkpoint, never
anything the submission pickled, so a requeued job (which reruns the original submission) resumes.
Each task is one rank (one per GPU); ranks come from SLURM's variables (vlmtrain.distributed.env).
SIGUSR2, which SLURM sends `signal_delay_s` before the time limit (and a preempting scheduler may send),
makes the ranks save at the next step boundary; rank 0 then requeues the job while its restart count
is below `max_requeues`. Other stop signals (scancel's SIGTERM) save and stop without requeueing.
Each task starts as `vlmtrain.cluster.job`, which catches these signals from its first line and runs
the run (`TrainJob`); submitting does not import the Trainer.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shlex
import subprocess
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from omegaconf import OmegaConf
from submitit.core.utils import FailedJobError

from vlmtrain.cluster.job import CONFIG_FILE, TrainJob
from vlmtrain.cluster.jobs import JOBS_FILE, cluster_name
from vlmtrain.schema import ClusterConfig, ConfigError, RunConfig

log = logging.getLogger("vlmtrain")


@dataclass
class Pending:
    """A run prepared for submission: its pinned config is on disk in `run_dir`."""

    run_dir: Path
    cluster: ClusterConfig
    overrides: list[str]


def prepare(config: RunConfig, run_dir: str | Path, overrides: list[str] | None = None) -> Pending:
    """Pin the run's directory (absolute) and write its resolved config there for the job to read."""
    run_dir = Path(run_dir).expanduser().resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} is a file")
    config = dataclasses.replace(config, run_dir=str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(dataclasses.asdict(config)), run_dir / CONFIG_FILE)
    return Pending(run_dir, config.cluster, list(overrides or []))


def check_cluster(cluster: ClusterConfig) -> None:
    """The partition exists, has the nodes asked for and its nodes the GPUs: one line naming the field,
    before anything is submitted (SLURM itself would keep such a job pending for ever)."""
    partitions = _partitions()
    partition = cluster.partition or ""
    if partition not in partitions:
        names = ", ".join(sorted(p for p in partitions if p))
        raise ConfigError(
            f"cluster.partition: no partition {cluster.partition!r} on this cluster (it has: {names})"
        )
    gpus, nodes, cpus = partitions[partition]
    where = f"partition {cluster.partition}" if cluster.partition else "the default partition"
    if cluster.gpus_per_node > gpus:
        raise ConfigError(
            f"cluster.gpus_per_node: {cluster.gpus_per_node} asked, the nodes of {where} have {gpus}"
        )
    if cluster.nodes > nodes:
        raise ConfigError(f"cluster.nodes: {cluster.nodes} asked, {where} has {nodes}")
    tasks = sbatch_parameters(cluster)["ntasks_per_node"]
    if cluster.cpus_per_task * tasks > cpus:
        raise ConfigError(
            f"cluster.cpus_per_task: {cluster.cpus_per_task} x {tasks} task(s) per node asked, the nodes of "
            f"{where} have {cpus} CPUs"
        )


def _partitions() -> dict[str, tuple[int, int, int]]:
    """Partition -> (most GPUs of a node, number of nodes, most CPUs of a node), from sinfo; the default
    one also as ''."""
    try:
        listing = subprocess.run(  # a line per node of each partition
            ["sinfo", "-h", "-N", "-o", "%P|%G|%c"], capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        raise ConfigError(
            "cluster.name: slurm, but SLURM's commands (sinfo, sbatch) are not on PATH"
        ) from None
    if listing.returncode != 0:
        raise ConfigError(f"cluster.name: slurm, but sinfo failed: {listing.stderr.strip()}")
    found: dict[str, tuple[int, int, int]] = {}
    for line in listing.stdout.split():
        name, gres, node_cpus = line.split("|")
        default, name = name.endswith("*"), name.rstrip("*")
        count = max(
            (int(g.split(":")[-1].split("(")[0]) for g in gres.split(",") if g.startswith("gpu")), default=0
        )
        gpus, nodes, cpus = found.get(name, (0, 0, 0))
        found[name] = (max(gpus, count), nodes + 1, max(cpus, int(node_cpus)))
        if default:
            found[""] = found[name]
    return found


def sbatch_parameters(cluster: ClusterConfig) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for `cluster` (one task per GPU unless told otherwise)."""
    tasks = cluster.tasks_per_node or max(1, cluster.gpus_per_node)
    optional = {
        "partition": cluster.partition,
        "account": cluster.account,
        "qos": cluster.qos,
        "constraint": cluster.constraint,
        "exclude": cluster.exclude,
        "gpus_per_node": cluster.gpus_per_node or None,
        "mem": f"{cluster.mem_gb:g}G" if cluster.mem_gb else None,
    }
    return {
        "job_name": "vlmtrain",
        "nodes": cluster.nodes,
        "ntasks_per_node": tasks,
        "cpus_per_task": cluster.cpus_per_task,
        "time": cluster.time_min,
        "signal_delay_s": cluster.signal_delay_s,
        "array_parallelism": cluster.array_parallelism,
        "setup": list(cluster.setup),
        "srun_args": list(cluster.srun_args),
        "additional_parameters": {"requeue": True, **cluster.additional_parameters},
        **{key: value for key, value in optional.items() if value is not None},
    }


class JobExecutor(submitit.SlurmExecutor):
    """submitit's executor, with `vlmtrain.cluster.job` as the command each task runs."""

    @property
    def _submitit_command_str(self) -> str:
        return f"{self.python} -u -m vlmtrain.cluster.job {shlex.quote(str(self.folder))}"


def submit(runs: list[Pending], log_folder: Path) -> list[str]:
    """Submit one job, or one job array for several runs; return the job ids. Returns at once."""
    cluster = runs[0].cluster
    if any(run.cluster != cluster for run in runs):
        raise ConfigError("cluster: a sweep's points must share one cluster config (it is one job array)")
    executor = JobExecutor(folder=log_folder / "%j", max_num_timeout=cluster.max_requeues)
    executor.update_parameters(**sbatch_parameters(cluster))
    try:
        with redirect_stderr(io.StringIO()):  # submitit prints sbatch's complaint, then raises it
            if len(runs) == 1:
                jobs = [executor.submit(TrainJob(str(runs[0].run_dir)))]
            else:
                with executor.batch():  # one sbatch call: a job array, its ids known once the block ends
                    jobs = [executor.submit(TrainJob(str(run.run_dir))) for run in runs]
    except FailedJobError as refused:  # a value SLURM cannot satisfy (CPUs, memory, a node name, ...)
        reasons = [line.removeprefix("sbatch: error: ") for line in str(refused).splitlines() if line.strip()]
        raise ConfigError(f"cluster: sbatch refused the job: {'; '.join(reasons)}") from None
    record = {"log_folder": str(log_folder), "cluster": cluster_name()}
    for run, job in zip(runs, jobs):
        with open(run.run_dir / JOBS_FILE, "a") as handle:
            handle.write(json.dumps({"job_id": job.job_id, **record}) + "\n")
    return [job.job_id for job in jobs]
