"""vlmtrain-torchrun ends with its workers' exit code where torchrun itself exits 1: a stop by signal N
is 128 + N (whether the agent or only the workers got the signal), a config error 2, success 0."""

import signal

import pytest
import torch.distributed.run
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from vlmtrain import cli


def _failed(*codes: int) -> ChildFailedError:
    failures = {rank: ProcessFailure(rank, 1000 + rank, code, "<N/A>") for rank, code in enumerate(codes)}
    for rank, failure in failures.items():
        failure.timestamp = 10 + rank  # rank 0 failed first
    return ChildFailedError("vlmtrain.cli", failures)


@pytest.mark.parametrize(
    "raised,code",
    [
        (SignalException("agent got SIGTERM", signal.SIGTERM), 143),
        (_failed(143, 143), 143),  # the workers caught SIGTERM, saved and exited 128 + 15
        (_failed(-signal.SIGKILL, 143), 137),  # a worker killed outright
        (_failed(2, 2), 2),
        (None, None),
    ],
)
def test_exit_code_is_the_workers(monkeypatch, raised, code):
    seen = []

    def launcher(argv: list[str]) -> None:
        seen.append(argv)
        if raised is not None:
            raise raised

    monkeypatch.setattr(torch.distributed.run, "main", launcher)
    if code is None:
        cli.torchrun(["--nproc-per-node", "2", "-m", "vlmtrain.cli"])
    else:
        with pytest.raises(SystemExit) as exit_:
            cli.torchrun(["--nproc-per-node", "2", "-m", "vlmtrain.cli"])
        assert exit_.value.code == code
    assert seen == [["--nproc-per-node", "2", "-m", "vlmtrain.cli"]]
