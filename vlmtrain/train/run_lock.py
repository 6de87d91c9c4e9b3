"""One process tree per run folder: `run_dir/run.lock` names the process that trains there.

The lock is taken (by rank 0, or the launching process) before anything is written or swept in the run
folder and let go when that process ends, however it ends short of SIGKILL. It holds the holder's host,
pid, the pid's start time, its SLURM job (and restart count) and when it began. A second launch is refused
with a RunInUse naming the holder. A lock left by a holder that is gone is taken over: a holder on this
host whose pid no longer runs, or runs as a different process (its start time differs: the pid was
reused, or the machine rebooted), or an earlier run of this same SLURM job (a requeue). A holder on
another host cannot be checked from here; the message says how to free the folder if it is gone.

Why it holds on a shared filesystem across nodes: `flock` and `fcntl` locks are not used (NFS may ignore
them or emulate them per node). The lock file is written completely under a name of its own, then
hard-linked to `run.lock`: `link` is atomic on NFS (v2 and later) and fails if the name exists, so of two
processes on any nodes exactly one creates it, and a reader never sees a half-written lock. An NFSv2
server may answer a link that succeeded with an error when its reply is lost and the call retried, so
success is read from the link count of the private file (2 once linked), as the classic NFS lock
recipe does. Where hard links are not supported, an O_CREAT|O_EXCL create (atomic from NFSv3 on) is
used instead. Taking over a stale lock goes through a second such lock (`run.lock.break`), so that two
processes judging the same lock stale do not both take it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("vlmtrain")
LOCK_FILE = "run.lock"
BREAK_AFTER_S = 60.0  # a takeover holds `run.lock.break` for milliseconds; one this old is left behind
NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


class RunInUse(RuntimeError):
    """The run folder is in use by another process, or cannot be locked (a read-only folder)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_start: str | None  # boot id and the pid's start time: a reused pid has another
    slurm_job: str | None
    slurm_restart: str | None
    since: str
    token: str  # tells this holder's lock from a later one

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"pid {self.pid} on host {self.host} (since {self.since}{job})"


def this_process() -> Holder:
    return Holder(
        host=socket.gethostname(),
        pid=os.getpid(),
        pid_start=process_start(os.getpid()),
        slurm_job=os.environ.get("SLURM_JOB_ID"),
        slurm_restart=os.environ.get("SLURM_RESTART_COUNT", "0") if "SLURM_JOB_ID" in os.environ else None,
        since=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        token=uuid.uuid4().hex,
    )


def process_start(pid: int) -> str | None:
    """`<boot id>:<start time in clock ticks>` of a running pid on Linux; None if it does not run (or
    there is no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return f"{boot}:{stat.rpartition(')')[2].split()[19]}"  # field 22, counted after the command name


def stale_reason(holder: Holder, me: Holder) -> str | None:
    """Why `holder` is known to be gone, or None when it may still be running."""
    if holder.slurm_job and holder.slurm_job == me.slurm_job and holder.slurm_restart != me.slurm_restart:
        return f"SLURM requeued job {holder.slurm_job}"
    if holder.host != me.host:
        return None
    if holder.pid_start is not None and Path("/proc").is_dir():
        return None if process_start(holder.pid) == holder.pid_start else f"pid {holder.pid} has ended"
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return f"pid {holder.pid} has ended"
    except PermissionError:
        pass
    return None


class RunLock:
    """`RunLock.take(run_dir)` holds the folder until `release()`. Taking it again in the same process
    (the launcher, then the Trainer) counts, and the last release lets go."""

    _held: dict[Path, RunLock] = {}

    def __init__(self, path: Path, holder: Holder) -> None:
        self.path, self.holder, self.count = path, holder, 1

    @classmethod
    def take(cls, run_dir: str | Path) -> RunLock:
        run_dir = Path(run_dir).expanduser()
        path = run_dir.resolve() / LOCK_FILE
        if (held := cls._held.get(path)) is not None:
            held.count += 1
            return held
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = cls(path, _acquire(path, run_dir))
        except OSError as error:
            reason = error.strerror or str(error)
            raise RunInUse(f"{run_dir}: cannot write in the run folder ({reason})") from None
        cls._held[path] = lock
        return lock

    def release(self) -> None:
        self.count -= 1
        if self.count > 0 or self._held.get(self.path) is not self:
            return
        del self._held[self.path]
        holder = _read(self.path)
        if holder is not None and holder.token == self.holder.token:  # never a lock taken over since
            self.path.unlink(missing_ok=True)

    @classmethod
    def release_all(cls) -> None:
        """Let go of every lock this process holds (its launcher's `finally`)."""
        for lock in list(cls._held.values()):
            lock.count = 1
            lock.release()


def _acquire(path: Path, run_dir: Path) -> Holder:
    me = this_process()
    for _ in range(20):  # each turn either creates the lock, refuses, or removes a stale one
        if _create(path, me):
            return me
        holder = _read(path, wait_s=2.0)
        if holder is None:
            if path.exists():  # still unreadable after the wait: not a lock this code wrote
                raise RunInUse(f"{run_dir} is locked by an unreadable {path}; delete it if no run is alive")
            continue  # released meanwhile
        reason = stale_reason(holder, me)
        if reason is None:
            raise RunInUse(
                f"{run_dir} is in use by {holder.describe()}; stop that run first (the same command then "
                f"resumes), or delete {path} if it no longer runs"
            )
        if _break(path, holder, me):
            log.warning("took over %s from %s: %s", path, holder.describe(), reason)
    raise RunInUse(f"{run_dir}: could not take {path} (other processes keep taking it)")


def _create(path: Path, holder: Holder) -> bool:
    """Create `path` holding `holder`, atomically; False if it exists."""
    data = json.dumps(asdict(holder)).encode()
    private = path.with_name(f".{path.name}.{holder.host}.{holder.pid}.{holder.token[:8]}")
    _write_new(private, data)
    try:
        try:
            os.link(private, path)
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in NO_HARD_LINKS:
                return private.stat().st_nlink == 2  # an NFS retry may report a link that was made
            return _create_exclusive(path, data)
        return private.stat().st_nlink == 2
    finally:
        private.unlink(missing_ok=True)


def _create_exclusive(path: Path, data: bytes) -> bool:
    try:
        _write_new(path, data)
    except FileExistsError:
        return False
    return True


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path, wait_s: float = 0.0) -> Holder | None:
    """The lock's holder; None if there is no lock, or (after `wait_s`) it cannot be read."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return Holder(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):  # an exclusive create still being written
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)


def _break(path: Path, stale: Holder, me: Holder) -> bool:
    """Remove the stale lock `stale` unless another process got there first; True if removed."""
    guard = path.with_name(path.name + ".break")
    if not _create(guard, me):
        try:
            if time.time() - guard.stat().st_mtime > BREAK_AFTER_S:
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        time.sleep(0.05)
        return False
    try:
        current = _read(path)
        if current is None or current.token != stale.token:
            return False  # removed or replaced meanwhile
        path.unlink(missing_ok=True)
        return True
    finally:
        guard.unlink(missing_ok=True)


def lock_run(run_dir: str | Path, *, is_main: bool, device: torch.device) -> RunLock | None:
    """The run's lock, taken by rank 0 only; every rank learns whether it was (one collective), so a
    refused launch ends on every rank together and the other ranks of a job are never refused."""
    from vlmtrain.distributed.agree import first_error  # torch: not needed by the lock itself

    lock, failed = None, None
    if is_main:
        try:
            lock = RunLock.take(run_dir)
        except RunInUse as error:
            failed = str(error)
    if (message := first_error(failed, device)) is not None:
        raise RunInUse(message)
    return lock
