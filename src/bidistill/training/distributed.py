"""Data parallel training under ``torchrun``: one process per GPU (or CPU process, gloo).

A step's gradients are summed over the processes with one all-reduce over a flat buffer, so N
processes give the weights of one up to summation order. By hand rather than with the DDP
wrapper, because stages that freeze part of a method or leave parameters unused (BD's warm-up,
``kd``'s student stage) would need ``find_unused_parameters`` and a re-wrap per stage. Batch-norm
statistics are averaged at each epoch's end (each process's saw other bags; DDP keeps rank 0's).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bidistill.devices import resolve_device


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def start_processes(device: torch.device) -> Processes:
    """Join the process group torchrun set up (nccl on GPUs, gloo on CPUs); a no-op alone."""
    if not launched_by_torchrun():
        return Processes()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size())


def sum_gradients(parameters: Iterable[nn.Parameter], processes: Processes) -> None:
    """Sum every parameter's gradient over the processes (one all-reduce).

    A parameter without a gradient in every process keeps none (as alone: the optimiser then
    skips it, weight decay included).
    """
    if not processes.distributed:
        return
    import torch.distributed as dist

    params = list(parameters)
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    flat = torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
            for p in params
        ]
    )
    dist.all_reduce(has)
    dist.all_reduce(flat)
    start = 0
    for p, flag in zip(params, has.tolist()):
        n = p.numel()
        if flag > 0:
            p.grad = flat[start : start + n].view_as(p).to(p.dtype).clone()
        start += n


def average_buffers(module: nn.Module, processes: Processes) -> None:
    """Average floating-point buffers (batch-norm running statistics) over the processes."""
    if not processes.distributed:
        return
    import torch.distributed as dist

    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(processes.world)


def broadcast_parameters(module: nn.Module, processes: Processes) -> None:
    """Rank 0's parameters and buffers in every process (they start from the same seed; this
    makes sure)."""
    if not processes.distributed:
        return
    import torch.distributed as dist

    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def gather(value: Any, processes: Processes) -> list[Any]:
    """Every process's ``value``, in rank order, in every process."""
    if not processes.distributed:
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * processes.world
    dist.all_gather_object(values, value)
    return values


def barrier(processes: Processes) -> None:
    if processes.distributed:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[Processes]:
    """For a whole command: join torchrun's process group (if launched by torchrun) and leave
    it at the end."""
    if not launched_by_torchrun():
        yield Processes()
        return
    import torch.distributed as dist

    processes = start_processes(resolve_device(device_name))
    try:
        yield processes
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
