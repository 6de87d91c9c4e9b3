"""Who am I: torchrun, a SLURM task or a single process -> rank, world size, device, process group.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK and the rendezvous address. Inside a SLURM step without
them (one task per GPU, as `cluster=slurm` launches), the ranks come from SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID, the master is the first host of the job's node list and the port is derived from the job
id, so every task of a job agrees without talking first. Both then join with the same env:// code.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

PORT_BASE, PORT_RANGE = 20000, 20000


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device: 'cuda' requested but no GPU is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names: 'gpu[01-02,07],cpu1' -> gpu01 gpu02 gpu07 cpu1."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for number in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{number:0{len(first)}d}")
    return hosts


def slurm_rendezvous(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """torchrun's variables for a task of a SLURM step, or {} outside one (or under torchrun)."""
    if "WORLD_SIZE" in environ or "SLURM_PROCID" not in environ or "SLURM_STEP_ID" not in environ:
        return {}
    job = int(environ.get("SLURM_JOB_ID", "0"))
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS", "1"),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or expand_nodelist(environ["SLURM_JOB_NODELIST"])[0],
        "MASTER_PORT": environ.get("MASTER_PORT") or str(PORT_BASE + job % PORT_RANGE),
    }


def launch_rank(environ: dict[str, str] | os._Environ) -> int:
    """This process's rank before the process group is joined: torchrun's RANK, a SLURM task's
    SLURM_PROCID (inside a step), else 0."""
    return int(environ.get("RANK") or slurm_rendezvous(environ).get("RANK") or 0)


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group when launched by torchrun or as SLURM tasks; world size 1 otherwise."""
    os.environ.update(slurm_rendezvous(os.environ))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return DistEnv(rank, world_size, local_rank, chosen)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
