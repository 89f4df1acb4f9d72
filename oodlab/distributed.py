"""``torch.distributed`` helpers for runs under ``torchrun``: nothing else in oodlab reads ranks.

A plain process is world size 1, rank 0, so every caller has one code path. Under ``torchrun``
(``WORLD_SIZE`` > 1 in the environment) :func:`init` joins the process group with NCCL when CUDA
is present (each rank on ``cuda:LOCAL_RANK``) and gloo on the CPU.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["init", "shutdown", "rank", "world_size", "is_main", "barrier", "block", "all_reduce_sum", "broadcast_object"]


def init() -> bool:
    """Join the process group when launched by ``torchrun``; True if this is a distributed run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    return True


def shutdown() -> None:
    """Leave the process group (a no-op outside a distributed run)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a plain process): the rank that fits, scores and writes results."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op outside a distributed run)."""
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def block(n: int, rank: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous part of ``range(n)``: sizes differ by at most one, nothing is repeated."""
    r = globals()["rank"]() if rank is None else rank
    w = world_size() if world is None else world
    return range(n * r // w, n * (r + 1) // w)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks, in place (unchanged outside a distributed run)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself outside a distributed run)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
