"""Data-parallel plumbing for a cell, configured from torchrun's environment.

torchrun (and the PyTorchJob/TrainJob pods, whose ``PET_*`` variables torchrun
reads) sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a plain process has
none of them and is rank 0 of 1. Collectives here are no-ops for one process,
so the train loop has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable

import torch
import torch.distributed as tdist
from torch import Tensor


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """Rank, world size and local rank from the environment (torchrun's variables)."""
    return Dist(
        rank=int(os.environ.get("RANK", "0")),
        world=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init(dist: Dist, device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the process group: nccl on CUDA, gloo on the CPU (address and port from torchrun)."""
    if not dist.active or tdist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        kwargs["device_id"] = device
    tdist.init_process_group(**kwargs)


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.active:
        tdist.barrier()


def all_reduce_mean_(tensor: Tensor, dist: Dist) -> Tensor:
    """In place: the mean over ranks."""
    if dist.active:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        tensor /= dist.world
    return tensor


def all_reduce_sum_(tensor: Tensor, dist: Dist) -> Tensor:
    if dist.active:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def average_gradients_(params: Iterable[torch.nn.Parameter], dist: Dist) -> None:
    """Replace each gradient by its mean over ranks, in one collective (what DDP's hooks do per bucket)."""
    if not dist.active:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    flat /= dist.world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset: offset + n].view_as(g))
        offset += n


def all_gather_object(obj: Any, dist: Dist) -> list[Any]:
    """Every rank's ``obj``, in rank order (one process: ``[obj]``)."""
    if not dist.active:
        return [obj]
    out: list[Any] = [None] * dist.world
    tdist.all_gather_object(out, obj)
    return out
