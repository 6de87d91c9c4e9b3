"""The command each task of a submitted job runs (`python -u -m vlmtrain.cluster.job FOLDER`), in place
of submitit's own entry; the run it trains (`TrainJob`, what the submission pickles) and its logging.

Its first act is to catch the stop signals (`catch_early`): SLURM may send USR2 (its time-limit warning,
or a preempting scheduler's) or SIGTERM in a task's first seconds, while Python imports torch and the
Trainer is built, and their default action would end the task, and with it the job, unsaved and not
requeued. The Trainer starts with a signal caught then and stops at its first step boundary, where the
job saves and requeues (USR2) or stops, as it would had the signal come a minute later. submitit's own
signal handlers are left out (they would take a USR2 at startup for a time-out and requeue a run that
has nothing new to save); the submitted pickle is run and its result written as submitit's entry does.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from vlmtrain.distributed.stop import RunStopped, catch_early  # light: signal handling only

if TYPE_CHECKING:
    from vlmtrain.schema import ClusterConfig

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job logging, as locally
LOG_FILE = "cli.log"  # what Hydra names a `vlmtrain-train` run's log
CONFIG_FILE = "config.yaml"  # the resolved config a submitted run reads


def log_like_a_local_run(run_dir: Path, rank: int) -> None:
    """Log as `vlmtrain-train` does on this machine: INFO and up to stdout and `run_dir/cli.log` on rank 0;
    the other ranks' warnings and errors to both, each line prefixed with the rank."""
    formatter = logging.Formatter((f"[rank {rank}]" if rank else "") + LOG_FORMAT)
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(Path(run_dir) / LOG_FILE)):
        handler.setFormatter(formatter)
        handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        root.addHandler(handler)
    root.setLevel(logging.INFO)


class TrainJob:
    """What every task of a submitted job runs: the run in `run_dir`, resumed from its latest checkpoint."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def __call__(self) -> dict[str, float]:
        import torch  # the task's imports, after its signals are caught; not the submitter's
        from omegaconf import OmegaConf

        from vlmtrain.checkpoint.errors import UnsafeCheckpoint
        from vlmtrain.config_tree import typed_config
        from vlmtrain.extras import MissingExtra
        from vlmtrain.models.libraries import import_only_what_is_named
        from vlmtrain.schema import ConfigError
        from vlmtrain.train.run_lock import RunInUse
        from vlmtrain.train.trainer import Trainer

        # what the user can fix (the config, the files it names, the run folder another job holds): one
        # line in each task's log, as `vlmtrain-train` prints it, not a traceback from every rank
        user_errors = (
            ConfigError,
            FileNotFoundError,
            FileExistsError,
            MissingExtra,
            UnsafeCheckpoint,
            RunInUse,
        )

        log_like_a_local_run(Path(self.run_dir), int(os.environ.get("SLURM_PROCID", "0")))
        import_only_what_is_named()  # the job owns its process, as vlmtrain-train does
        # as many threads as CPUs allocated to the task, not as the node has (torchrun: 1 per worker)
        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", torch.get_num_threads())))
        try:
            config = typed_config(OmegaConf.load(Path(self.run_dir) / CONFIG_FILE))
            with Trainer(config) as trainer:
                return trainer.train()
        except RunStopped as stopped:
            self._after_stop(stopped, config.cluster)
            return {}
        except user_errors as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    def _after_stop(self, stopped: RunStopped, cluster: ClusterConfig) -> None:
        """Rank 0 requeues after SIGUSR2 while restarts remain; otherwise the job ends with the signal's code."""
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        requeue = stopped.signum == signal.SIGUSR2 and restarts < cluster.max_requeues
        if requeue:
            if os.environ.get("SLURM_PROCID", "0") == "0":
                job = os.environ.get("SLURM_JOB_ID", "")
                print(
                    f"{stopped}: requeueing job {job} (restart {restarts + 1} of {cluster.max_requeues})",
                    flush=True,
                )
                subprocess.run(["scontrol", "requeue", job], check=False)
            return
        reason = (
            f"cluster.max_requeues={cluster.max_requeues} reached" if stopped.signum == signal.SIGUSR2 else ""
        )
        print(
            f"{stopped}; not requeued{': ' + reason if reason else ''}: run the same command to resume",
            file=sys.stderr,
        )
        sys.exit(stopped.exit_code)


def run_submission(folder: str) -> None:
    """Run the pickled submission of this job (task) in `folder` and write its result for submitit."""
    from submitit.core import utils
    from submitit.core.job_environment import JobEnvironment

    os.environ["SUBMITIT_FOLDER"] = folder  # where submitit's paths for this job id are
    paths = JobEnvironment().paths
    for _ in range(60):  # a shared file system may show the submission late
        if paths.submitted_pickle.exists():
            break
        time.sleep(1)
    delayed = utils.DelayedSubmission.load(paths.submitted_pickle)
    try:
        result = delayed.result()
    except Exception:
        _write_result(paths.result_pickle, ("error", traceback.format_exc()))
        raise
    _write_result(paths.result_pickle, ("success", result))  # none after a stop (SystemExit)


def _write_result(path: Path, outcome: tuple) -> None:
    from submitit.core import utils

    with utils.temporary_save_path(path) as temporary:
        utils.cloudpickle_dump(outcome, temporary)


if __name__ == "__main__":
    catch_early()  # before anything slow: the unpickled job imports torch
    run_submission(sys.argv[1])
