"""Process-group setup for ``torchrun``: DDP when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    rank: int  # this process's rank (0 when not distributed)
    world_size: int  # number of processes
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(device: str) -> Runtime:
    """Resolve the device and, under ``torchrun``, join the process group."""
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but is not available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    target = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(target)
    return Runtime(rank, world_size, target)


def all_mean(value: float, runtime: Runtime) -> float:
    """Mean of a Python float over all ranks."""
    if not runtime.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t)
    return float(t.item()) / runtime.world_size


def gather_objects(obj, runtime: Runtime) -> list:
    """Every rank's ``obj``, in rank order (a one-element list when not distributed)."""
    if not runtime.distributed:
        return [obj]
    out = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def shutdown(runtime: Runtime) -> None:
    """Leave the process group, first collecting any unreachable object that may still refer to it
    (a DDP wrapper caught in a reference cycle would keep its reducer, and the group, alive past the
    destroy); a precaution: a plain DDP wrapper is freed on return without it."""
    if runtime.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
