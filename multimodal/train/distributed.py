"""torchrun support: one process per device, PyTorch's DistributedDataParallel, nothing home-made.

Under ``torchrun`` the environment carries RANK/WORLD_SIZE/LOCAL_RANK; a plain ``python -m`` run is a
world of one and never wraps the model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(device: str | None = None) -> tuple[World, torch.device]:
    """Join the process group when launched by torchrun (NCCL on CUDA, Gloo on CPU) and pick this
    process's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", world.local_rank if world.distributed else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return world, dev


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DDP only when there is more than one process. Unused parameters are allowed because a step's
    caption pass and instruction pass each use only part of what is trainable (e.g. text-only samples
    with a zero image still reach the resampler, but a phase may train no visual part at all)."""
    if not world.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def all_mean(value: float, world: World, device: torch.device) -> float:
    """The mean of a scalar over all processes (for logging)."""
    if not world.distributed:
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world.size


def finish(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
