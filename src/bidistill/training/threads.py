"""How many CPU threads torch uses while a method trains, chosen by the size of the work.

Most of our models are small: a logistic model on five clinical columns, or an attention-MIL on
64-dimensional features. Their tensors are tiny, so torch's intra-op threads spend more time
handing work over than computing, and when other processes load the machine each step waits
for a descheduled thread: on two shared cores a 10-epoch BD run took 25 s with two threads and
3 s with one. Large work (1024-d features, bags of hundreds of instances) still gains from
several threads, so only small work is pinned to one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

# Multiply-accumulates per training step (parameters x instances in a batch) below which one
# thread is faster than several. BD on 64-d features with bags of ~75 instances and batches of
# 16 is ~1e8; on 1024-d features with ~175 instances, ~1e9.
SMALL_STEP = 3e8


def step_size(method: torch.nn.Module, *, batch_size: int, bag_lengths: Sequence[int]) -> float:
    """A rough count of the work of one training step: parameters x instances per batch."""
    parameters = sum(p.numel() for p in method.parameters())
    mean_bag = sum(bag_lengths) / max(len(bag_lengths), 1)
    return float(parameters) * batch_size * max(mean_bag, 1.0)


@contextmanager
def cpu_threads_for(
    method: torch.nn.Module,
    device: torch.device,
    *,
    batch_size: int,
    bag_lengths: Sequence[int],
) -> Iterator[int]:
    """Use one torch thread for small work on the CPU (yields the threads used), and restore
    the setting afterwards; left alone on an accelerator, when ``OMP_NUM_THREADS`` is set (the
    user's choice) and when torch already uses one thread."""
    previous = torch.get_num_threads()
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ or previous == 1:
        yield previous
        return
    size = step_size(method, batch_size=batch_size, bag_lengths=bag_lengths)
    threads = 1 if size < SMALL_STEP else previous
    if threads != previous:
        log.info("small model (%.1e multiply-adds per step): training on one CPU thread", size)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)
