"""torch.distributed for `torchrun --nproc-per-node P -m edgessl pretrain ...`.

Every helper is the identity in a process that is alone, so the trainer has one code path.
gloo on CPU, nccl on CUDA; a timeout on every collective (EDGESSL_DIST_TIMEOUT seconds,
default 600) so a rank that died makes the others fail with an error instead of hanging.
A run that ends (or stops) on every rank meets at a barrier first (`finish`), so no rank leaves
while another still talks to it; the group is destroyed at interpreter exit, while Python is
still whole: gloo's worker threads torn down during finalization, or a peer that closed its
connections mid-collective, can abort the process (SIGABRT, "terminate called without an
active exception").
"""
from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init(device_type: str) -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return world()
    timeout = datetime.timedelta(seconds=float(os.environ.get("EDGESSL_DIST_TIMEOUT", "600")))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    atexit.register(destroy)
    return world()


def destroy() -> None:
    """Leave the process group, if this process is in one (at exit; a second call does nothing)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """Every rank has ended its run: wait for the others, then leave the group (alone: nothing)."""
    if world()[1] > 1:
        dist.barrier()
        destroy()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor of the same shape from every rank, in rank order."""
    if world()[1] == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world()[1])]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns t."""
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on one (a stop, a NaN: every rank acts alike)."""
    if world()[1] == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def from_rank0(value: float, device: torch.device) -> float:
    """Rank 0's value on every rank (a plan made from timings must be one plan)."""
    if world()[1] == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return t.item()
