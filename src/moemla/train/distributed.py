"""Data parallelism on PyTorch's own engine: `torchrun --nproc-per-node N -m moemla train ...` runs DDP."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moemla.device import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_name: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, device)
    if device.type == "cuda":
        local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= gpus:  # torchrun would die later with "invalid device ordinal" and a traceback
            raise ValueError(
                f"process {local} of this node needs GPU {local}, but the machine has {gpus}; launch at most "
                f"{gpus} processes per node (torchrun --nproc-per-node {gpus}) or train on the CPU with --device cpu"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), world, device)


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensors: list[torch.Tensor], d: Dist) -> None:
    """Sum in place over processes; a no-op for one process."""
    if d.world > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def gather_objects(obj: object, d: Dist) -> list[object]:
    if d.world == 1:
        return [obj]
    out: list[object] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out
