"""Data-parallel training under torchrun: which process this is, and the few collective
operations the trainer needs.

    torchrun --standalone --nproc_per_node=2 -m lenet train ...

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; with them `lenet train` runs one process per
rank: every rank draws the same seeded permutation and takes its share of each global batch
(the global batch stays --batch-size), DistributedDataParallel averages the gradients, and
rank 0 alone prints and writes the run folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lenet.errors import ConfigError, LenetError


class DistError(LenetError):
    """The processes of a data-parallel run could not meet."""


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist | None:
    """The torchrun process this is, or None when not launched by torchrun (or alone)."""
    env = os.environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={env['WORLD_SIZE']!r}, RANK={env['RANK']!r}: "
                          f"expected integers (as torchrun sets them)") from None
    return Dist(rank, world, local) if world > 1 else None


def waits_unannounced() -> str | None:
    """Where a rank set up by hand (WORLD_SIZE, RANK, MASTER_* without torchrun) will wait
    for the others: torchrun has already gathered them, by hand it may wait forever."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or not env.get("MASTER_ADDR"):
        return None
    return f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '?')}"


def init(dist: Dist, device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group (nccl on GPUs, gloo on CPUs); each rank gets its own GPU."""
    import torch.distributed as td

    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not td.is_initialized():
        env = os.environ
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise ConfigError(f"WORLD_SIZE={dist.world} and RANK={dist.rank} are set but "
                              f"{missing[0]} is not: launch with torchrun (see the README), "
                              "or unset WORLD_SIZE and RANK")
        try:
            td.init_process_group(backend=backend)
        except (RuntimeError, ValueError) as e:  # c10d's store and network errors
            first = next((line for line in str(e).splitlines() if line.strip()), "")
            raise DistError(f"rank {dist.rank} of {dist.world}: could not join the other "
                            f"processes ({first.strip()[:200]}); if another one stopped, its "
                            "output says why") from None
    return Dist(dist.rank, dist.world, dist.local_rank, backend), device


def close() -> None:
    import torch.distributed as td

    if td.is_initialized():
        td.destroy_process_group()


def sum_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over all ranks, in place."""
    import torch.distributed as td

    for t in tensors:
        td.all_reduce(t, op=td.ReduceOp.SUM)
