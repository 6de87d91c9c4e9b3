"""SLURM without a cluster: ranks from a task's environment, node lists, the sbatch parameters, a job's logging
and its signals at startup."""

import logging
import os
import signal
import sys

import pytest

from tests.helpers.runs import compose_train, restored_logging
from vlmtrain.cluster.job import log_like_a_local_run
from vlmtrain.cluster.slurm import sbatch_parameters
from vlmtrain.distributed.env import expand_nodelist, slurm_rendezvous
from vlmtrain.distributed.stop import STOP_SIGNALS, StopRequest, catch_early
from vlmtrain.schema import ClusterConfig, ConfigError


@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("localhost", ["localhost"]),
        ("gpu[01-02,07]", ["gpu01", "gpu02", "gpu07"]),
        ("a1,b[8-10],c", ["a1", "b8", "b9", "b10", "c"]),
        ("node-[001-003]", ["node-001", "node-002", "node-003"]),
    ],
)
def test_node_lists_expand(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def task_env(procid, **extra):
    return {
        "SLURM_PROCID": str(procid),
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "16",
        "SLURM_STEP_NUM_TASKS": "16",
        "SLURM_LOCALID": str(procid % 8),
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        **extra,
    }


def test_a_task_of_a_two_node_step_finds_its_rank_and_the_master():
    got = slurm_rendezvous(task_env(11))
    assert got == {
        "RANK": "11",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "3",
        "MASTER_ADDR": "gpu01",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }
    assert slurm_rendezvous(task_env(0))["MASTER_PORT"] == got["MASTER_PORT"]  # every task agrees


def test_torchrun_and_the_batch_shell_are_left_alone():
    assert slurm_rendezvous(task_env(1, WORLD_SIZE="4")) == {}  # torchrun inside the job
    batch_shell = {k: v for k, v in task_env(0).items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS")}
    assert slurm_rendezvous(batch_shell) == {}
    assert slurm_rendezvous({}) == {}


def test_sbatch_parameters_one_task_per_gpu():
    cluster = ClusterConfig(
        name="slurm",
        partition="gpu",
        account="team",
        nodes=2,
        gpus_per_node=8,
        cpus_per_task=10,
        mem_gb=480,
        time_min=1440,
        signal_delay_s=300,
        setup=["module load cuda"],
        additional_parameters={"mail-type": "END"},
    )
    params = sbatch_parameters(cluster)
    assert params["ntasks_per_node"] == 8 and params["gpus_per_node"] == 8 and params["nodes"] == 2
    assert params["time"] == 1440 and params["signal_delay_s"] == 300 and params["mem"] == "480G"
    assert params["partition"] == "gpu" and params["account"] == "team" and "qos" not in params
    assert params["additional_parameters"] == {"requeue": True, "mail-type": "END"}
    assert params["setup"] == ["module load cuda"]
    cpu_only = sbatch_parameters(ClusterConfig(name="slurm", time_min=10, tasks_per_node=2))
    assert cpu_only["ntasks_per_node"] == 2 and "gpus_per_node" not in cpu_only


def test_the_generated_sbatch_script_carries_the_signal_and_requeue(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    params = sbatch_parameters(ClusterConfig(name="slurm", time_min=30, signal_delay_s=90, partition="p"))
    params.pop("job_name")
    script = _make_sbatch_string(command="python -m x", folder=tmp_path, job_name="vlmtrain", **params)
    for line in (
        "#SBATCH --signal=USR2@90",
        "#SBATCH --requeue",
        "#SBATCH --time=30",
        "#SBATCH --partition=p",
    ):
        assert line in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun.split()  # one failed task ends the others


@pytest.mark.parametrize(
    "fields,key",
    [
        ({"name": "pbs"}, "cluster.name"),
        ({"name": "slurm"}, "cluster.time_min"),
        ({"name": "slurm", "time_min": 1, "signal_delay_s": 60}, "cluster.signal_delay_s"),
        ({"nodes": 0}, "cluster.nodes"),
        ({"gpus_per_node": -1}, "cluster.gpus_per_node"),
        ({"tasks_per_node": 0}, "cluster.tasks_per_node"),
        ({"max_requeues": -1}, "cluster.max_requeues"),
    ],
)
def test_a_bad_cluster_config_is_one_line_naming_the_field(fields, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        ClusterConfig(**fields)


def test_a_job_logs_rank_0_and_the_warnings_of_other_ranks_prefixed(tmp_path, capsys):
    with restored_logging():
        for rank in (0, 1):
            log_like_a_local_run(tmp_path, rank)
            logging.getLogger("vlmtrain").info("step %d", rank)
            logging.getLogger("vlmtrain").warning("slow shard on %d", rank)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" - ")[1] for line in printed] == ["step 0", "slow shard on 0", "slow shard on 1"]
    assert printed[2].startswith("[rank 1][") and printed[2].endswith("[vlmtrain][WARNING] - slow shard on 1")
    logged = (tmp_path / "cli.log").read_text().splitlines()
    assert len(logged) == 3 and logged[2].startswith("[rank 1][") and logged[0].startswith("[20")
    assert logged[0].endswith("[vlmtrain][INFO] - step 0")


def test_a_stop_signal_caught_at_startup_is_the_trainers_stop():
    """A task catches USR2 from its first line; the Trainer's StopRequest, made later, starts with it."""
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        catch_early()
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)  # the first names the stop
        request = StopRequest()
        assert request.signum == signal.SIGUSR2
        request.restore()
        assert StopRequest().signum == 0  # taken once
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_a_task_of_a_job_script_catches_stop_signals_before_anything_slow(monkeypatch, capsys):
    """`srun vlmtrain-train ...` (launch/sbatch_example.sh): the entry point's first act in a SLURM step
    keeps a USR2 for the Trainer, as a submitted job's tasks do; submitting (cluster=slurm) does not."""
    from vlmtrain import cli

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        monkeypatch.setattr(sys, "argv", ["vlmtrain-train", "cluster=slurm", "--help"])
        cli.train()
        assert signal.getsignal(signal.SIGUSR2) == before[signal.SIGUSR2]
        monkeypatch.setattr(sys, "argv", ["vlmtrain-train", "--help"])
        cli.train()  # --help: the entry point returns right after its first act
        os.kill(os.getpid(), signal.SIGUSR2)  # the default action would end this process
        assert StopRequest().signum == signal.SIGUSR2
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    capsys.readouterr()


def test_a_config_error_in_a_job_is_one_line_in_its_log(tmp_path, capsys):
    """The config a task reads cannot train (here: shards that are not there): `error: ...` and exit code
    2, as `vlmtrain-train` says it, not a traceback in every task's log."""
    from omegaconf import OmegaConf

    from vlmtrain.cluster.job import CONFIG_FILE, TrainJob

    OmegaConf.save(
        OmegaConf.merge(
            compose_train(
                [
                    "cluster=slurm",
                    "cluster.time_min=10",
                    "data.synthetic=null",
                    "data.train_shards=/nonexistent/shards",
                ]
            ),
            {"run_dir": str(tmp_path)},
        ),
        tmp_path / CONFIG_FILE,
    )
    with restored_logging(), pytest.raises(SystemExit) as exit_:
        TrainJob(str(tmp_path))()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
