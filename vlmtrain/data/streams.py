"""Shard byte streams that cannot hang: every read has a deadline, and a command dies with its reader.

A command's stdout (a `pipe:` shell line, curl for http) is waited for with `poll`: a command that writes
nothing for `timeout_s` seconds is killed and the read raises TimeoutError. The command runs in a process
group of its own, killed whenever the stream is given up, and it dies with the process reading it,
whatever kills that one: the child asks the kernel for a signal when its parent dies (PR_SET_PDEATHSIG).
A shell line runs as a job of a small wrapper shell that turns that signal into a kill of its whole
group, so every process of a pipeline goes too.

Other blocking streams (fsspec's files) are opened and read by a thread whose chunks the reader waits
for with the same deadline; a read that times out is left to that thread, which ends with the process.
"""

from __future__ import annotations

import ctypes
import os
import queue
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import BinaryIO

CHUNK = 1 << 16
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# The command runs as a job of this shell, whose group is its own (start_new_session): the shell's
# parent dying sends it SIGTERM (PR_SET_PDEATHSIG), on which it kills the group, itself included;
# otherwise `wait` hands back the command's exit status.
WRAPPER = 'trap "kill -KILL 0" TERM\n{{ {command}\n}} &\nwait $!'


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # looked up before any fork: a forked child only calls it


def die_with_parent(signum: int, parent: int) -> None:
    """Have the kernel send `signum` to this process when its parent dies (Linux only); if the parent
    `parent` is already gone (it died before this call), send it now."""
    if _PRCTL is None:
        return
    _PRCTL(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)


def _start_child(signum: int, parent: int) -> None:
    """In the command's process before it starts: the signals a data worker ignores are the defaults
    again (an ignored signal stays ignored through exec, and a shell cannot trap it), then it is bound
    to die with its parent."""
    for each in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(each, signal.SIG_DFL)
    die_with_parent(signum, parent)


class CommandFailed(OSError):
    """A command that exited with a status other than the ones accepted; `detail`: what it wrote to stderr
    (curl's only: a shell line's stderr is the user's)."""

    def __init__(self, command: str, status: int, detail: str = "") -> None:
        super().__init__(f"command exited with status {status}" + (f": {detail}" if detail else ""))
        self.command, self.status, self.detail = command, status, detail


class CommandStream:
    """The stdout of `argv` (or of the shell line `shell`), read with a deadline of `timeout_s` seconds
    without a byte. `close()` raises CommandFailed for an exit status outside `accepted`."""

    def __init__(
        self,
        argv: list[str] | None = None,
        *,
        shell: str | None = None,
        timeout_s: float = 60.0,
        accepted: tuple[int, ...] = (0,),
    ) -> None:
        parent, self.shell = os.getpid(), shell is not None
        if shell is not None:
            argv = ["/bin/sh", "-c", WRAPPER.format(command=shell)]
        # a shell line's wrapper kills its group on SIGTERM; a single program (curl) just dies
        signum = signal.SIGTERM if self.shell else signal.SIGKILL
        self.command = shell if shell is not None else " ".join(argv)
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=None if self.shell else subprocess.PIPE,  # curl's one error line, to name the failure
            start_new_session=True,
            preexec_fn=lambda: _start_child(signum, parent),
        )
        self.timeout_s, self.accepted, self.aborted = timeout_s, accepted, False
        self.fd = self.proc.stdout.fileno()
        self.poll = _poller(self.fd)

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (all that is left if `size` < 0); fewer only at the end of the stream."""
        parts, left = [], size if size >= 0 else sys.maxsize
        while left > 0:
            if not self.poll.poll(self.timeout_s * 1000):
                self.abort()
                raise TimeoutError(f"no data for {self.timeout_s:g} s (read timeout)")
            data = os.read(self.fd, min(left, CHUNK))
            if not data:
                break
            parts.append(data)
            left -= len(data)
        return b"".join(parts)

    def close(self) -> None:
        """Wait for the command (at most `timeout_s`) and raise CommandFailed if it failed."""
        if self.proc.stdout.closed:
            return
        self.proc.stdout.close()
        try:
            status = self.proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.abort()
            raise TimeoutError(f"the command did not exit within {self.timeout_s:g} s") from None
        detail = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
        if self.proc.stderr:
            self.proc.stderr.close()
        if not self.aborted and status not in self.accepted:
            raise CommandFailed(self.command, _shell_status(status), " ".join(detail.split()))

    def abort(self) -> None:
        """Kill the command's whole process group now; its exit status no longer counts."""
        self.aborted = True
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not self.proc.stdout.closed:
            self.close()

    def __repr__(self) -> str:
        return f"CommandStream({self.command!r})"


def _poller(fd: int) -> select.poll:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return poller


def _shell_status(status: int) -> int:
    """A status as a shell reports it: 128 + N for a process ended by signal N."""
    return 128 - status if status < 0 else status


class ThreadedStream:
    """A blocking stream (opened by `opener`) read by a thread, each wait for a chunk bounded by
    `timeout_s`; the thread reads at most a few chunks ahead."""

    def __init__(self, opener: Callable[[], BinaryIO], timeout_s: float = 60.0, ahead: int = 4) -> None:
        self.timeout_s, self.pending, self.done = timeout_s, b"", False
        self.chunks: queue.Queue = queue.Queue(maxsize=ahead)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._pump, args=(opener,), daemon=True)
        self.thread.start()

    def _pump(self, opener: Callable[[], BinaryIO]) -> None:
        try:
            with opener() as stream:
                while not self.stop.is_set():
                    data = stream.read(CHUNK)
                    self._put(data)
                    if not data:
                        return
        except BaseException as error:  # handed to the reader, which raises it
            self._put(error)

    def _put(self, item: bytes | BaseException) -> None:
        while not self.stop.is_set():
            try:
                self.chunks.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def read(self, size: int = -1) -> bytes:
        parts, have = [self.pending], len(self.pending)
        while (size < 0 or have < size) and not self.done:
            try:
                item = self.chunks.get(timeout=self.timeout_s)
            except queue.Empty:
                self.close()
                raise TimeoutError(f"no data for {self.timeout_s:g} s (read timeout)") from None
            if isinstance(item, BaseException):
                self.close()
                raise item
            self.done = not item
            parts.append(item)
            have += len(item)
        data = b"".join(parts)
        cut = len(data) if size < 0 else size
        self.pending = data[cut:]
        return data[:cut]

    def close(self) -> None:
        self.stop.set()  # the thread ends after its current read, whenever that returns
