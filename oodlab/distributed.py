"""``torch.distributed`` helpers for runs under ``torchrun``: nothing else in oodlab reads ranks.

A plain process is world size 1, rank 0, so every caller has one code path. Under ``torchrun``
(``WORLD_SIZE`` > 1 in the environment) :func:`init` joins the process group with NCCL when CUDA
is present (each rank on ``cuda:LOCAL_RANK``) and gloo on the CPU.
"""

from __future__ import annotations

import os
import re
import signal
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["PeerError", "init", "shutdown", "rank", "world_size", "is_main", "barrier", "block", "all_reduce_sum",
           "broadcast_object", "all_gather_cat", "average_gradients", "average_buffers"]


class PeerError(RuntimeError):
    """A collective step failed because another rank stopped (that rank's own one-line message says why)."""


def _together(collective, /, *args, **kwargs):
    """Run ``collective``; a peer that stopped (gloo or NCCL closing its connections, a timeout) is a
    :class:`PeerError` in one line instead of the backend's message."""
    try:
        return collective(*args, **kwargs)
    except RuntimeError as exc:
        said = re.sub(r"^\[[^\]]*\]\s*", "", (str(exc).splitlines() or [""])[0]).split(". ")[0][:100]
        said = said or type(exc).__name__
        raise PeerError(f"another rank stopped before this one finished ({dist.get_backend()}: {said}); its own "
                        "message says why: fix that and run the same command again (finished shards and rows are "
                        "kept)") from None


def init() -> bool:
    """Join the process group when launched by ``torchrun`` (and not joined yet); True if this call joined it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    signal.signal(signal.SIGTERM, _stopped_by_launcher)
    return True


def _stopped_by_launcher(signum: int, frame: object) -> None:
    """torchrun stops the other ranks (SIGTERM) when one fails: say so in one line rather than vanish."""
    raise PeerError("torchrun stopped this rank because another rank failed; its own message says why: fix that and "
                    "run the same command again (finished shards and rows are kept)")


def shutdown(wait: bool = True) -> None:
    """Leave the process group (a no-op outside a distributed run), once every rank is done with it if ``wait``.

    Waiting first is for a run that went well: a rank that tears its connections down while another
    still talks to it can make gloo's threads abort that process at exit. A rank that failed leaves at
    once, so the others' next collective fails instead of waiting for it.
    """
    if dist.is_initialized():
        if wait:
            barrier()
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
            _together(dist.barrier, device_ids=[torch.cuda.current_device()])
        else:
            _together(dist.barrier)


def block(n: int, rank: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous part of ``range(n)``: sizes differ by at most one, nothing is repeated."""
    r = globals()["rank"]() if rank is None else rank
    w = world_size() if world is None else world
    return range(n * r // w, n * (r + 1) // w)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks (a new tensor on ``t``'s device; ``t`` itself outside a distributed run)."""
    if not dist.is_initialized():
        return t
    out = t.detach().clone().to(_device())
    _together(dist.all_reduce, out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself outside a distributed run)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    _together(dist.broadcast_object_list, box, src=0)
    return box[0]


def _device() -> torch.device:
    """Where collective tensors must live: the current CUDA device under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order (the ranks' lengths may differ)."""
    if not dist.is_initialized():
        return t
    dev = _device()
    n = torch.tensor([len(t)], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    _together(dist.all_gather, sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: len(t)] = t.to(dev)
    parts = [torch.zeros_like(padded) for _ in sizes]
    _together(dist.all_gather, parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).to(t.device)


def average_gradients(params: list[torch.nn.Parameter], weight: float) -> None:
    """Replace each gradient by the ``weight``-weighted mean over ranks (``weight`` = this rank's share of
    the global batch, e.g. its number of samples), in one all-reduce of a flat buffer."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in params if p.grad is not None]
    dev = _device()
    flat = torch.cat([g.reshape(-1).to(dev) for g in grads] + [torch.ones(1, device=dev)]).mul_(weight)
    _together(dist.all_reduce, flat, op=dist.ReduceOp.SUM)
    flat = flat[:-1] / flat[-1]  # the last entry summed the weights
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (batch-norm running statistics) over ranks, in place."""
    if not dist.is_initialized():
        return
    for b in module.buffers():
        if b.is_floating_point():
            t = b.detach().to(_device())
            _together(dist.all_reduce, t, op=dist.ReduceOp.SUM)
            b.copy_(t / world_size())
