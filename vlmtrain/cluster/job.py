"""The command each task of a submitted job runs (`python -u -m vlmtrain.cluster.job FOLDER`), in place
of submitit's own entry, and the job's logging.

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
import sys
import time
import traceback
from pathlib import Path

from vlmtrain.distributed.stop import catch_early  # light: signal handling only

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job logging, as locally
LOG_FILE = "cli.log"  # what Hydra names a `vlmtrain-train` run's log


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
