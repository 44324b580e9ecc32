"""Prediction in bounded memory, for bags of any size.

Training caps a bag at ``training.max_instances``; prediction reads whole bags, and a slide of
2e7 tiles would otherwise ask for tens of GB: the aggregator projects every instance to H
dimensions and the gated attention adds two more such layers. Here:

- ``streaming_aggregation(method)``: within the block, gated-attention and mean-pool aggregators
  project a large bag ``CHUNK_INSTANCES`` instances at a time and pool them with an online
  (running-maximum) softmax, which gives the same embedding as the one-pass formula, up to float
  rounding; bags up to the chunk size take the one-pass code unchanged, so ordinary predictions
  stay bit-identical. Aggregators that attend between instances (TransMIL) cannot be streamed and
  are refused by the memory check below when a bag is too large for them.
- ``prediction_loader``: batches of at most ``batch_size`` bags and at most ``BATCH_BYTES`` of
  padded input, so one huge bag is predicted on its own, after a check that it fits in memory
  (``check_prediction_memory``) made before anything is allocated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from bidistill.errors import BidistillError
from bidistill.features.hygiene import available_memory_bytes, format_bytes
from bidistill.models.aggregators import (
    Aggregate,
    GatedAttentionMIL,
    MeanPoolMIL,
    TransMIL,
)
from bidistill.models.streaming import PoolStream, streams
from bidistill.training.data import collate_bags

# Instances projected at once by a streamed aggregator (64k x 128 hidden floats: 32 MB).
CHUNK_INSTANCES = 65_536
# Padded input per prediction batch (B x N_max x D float32).
BATCH_BYTES = 256 * 2**20
# A prediction may use at most this share of the available memory.
MEMORY_SHARE = 0.6


class PredictionMemoryError(BidistillError, MemoryError):
    """A bag too large to predict in the memory of this machine."""


# --- streaming aggregation ----------------------------------------------------------------------


@contextlib.contextmanager
def streaming_aggregation(method: nn.Module, chunk: int | None = None) -> Iterator[None]:
    """Within the block, the method's gated-attention and mean-pool aggregators process bags
    larger than ``chunk`` (default ``CHUNK_INSTANCES``) instances ``chunk`` at a time (eval
    mode: dropout is off)."""
    chunk = CHUNK_INSTANCES if chunk is None else chunk
    patched = []
    for module in method.modules():
        if streams(module):
            module.forward = _streamed(module, chunk)  # instance attribute: shadows the method
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _streamed(module: nn.Module, chunk: int):
    one_pass = type(module).forward.__get__(module)

    def forward(bags: Tensor, tile_valid: Tensor) -> Aggregate:
        if bags.shape[1] <= chunk:
            return one_pass(bags, tile_valid)
        stream = PoolStream(module, bags.shape[1])  # no [B, N, H] tensor is ever held
        for start in range(0, bags.shape[1], chunk):
            stream.update(bags[:, start : start + chunk], tile_valid[:, start : start + chunk])
        return stream.result()

    return forward


# --- memory check and batches -------------------------------------------------------------------


def prediction_bytes(method: nn.Module, n_instances: int, dim: int) -> int:
    """Peak bytes to predict one bag of ``n_instances`` x ``dim`` (float32), streamed.

    The bag itself is held about three times (as read, concatenated over the patient's slides,
    and padded into a batch); streamed aggregators add a constant per chunk; TransMIL's exact
    self-attention holds (1 + n)² weights per head.
    """
    bag = 3 * n_instances * dim * 4
    work = 0
    for module in method.modules():
        if streams(module):
            hidden = module.out_dim
            work = max(work, 6 * min(n_instances, CHUNK_INSTANCES) * hidden * 4 + 8 * n_instances)
        elif isinstance(module, TransMIL):
            heads = module.attentions[0].num_heads
            work = max(work, 3 * heads * (n_instances + 1) ** 2 * 4)
    return bag + work


def check_prediction_memory(
    method: nn.Module,
    lengths: Sequence[int],
    dim: int,
    names: Sequence[str] | None = None,
    available: int | None = None,
) -> None:
    """Refuse, before allocating anything, a bag that cannot be predicted in memory.

    Raises:
        PredictionMemoryError: naming the bag (patient), its size, the need and what is free.
    """
    if not len(lengths):
        return
    largest = int(np.argmax(lengths))
    needed = prediction_bytes(method, int(lengths[largest]), dim)
    available = available_memory_bytes() if available is None else available
    if needed > MEMORY_SHARE * available:
        who = f"patient '{names[largest]}'" if names is not None else f"bag {largest}"
        raise PredictionMemoryError(
            f"{who}: predicting its bag of {int(lengths[largest]):,} instances x {dim} needs "
            f"about {format_bytes(needed)}, more than {MEMORY_SHARE:.0%} of the "
            f"{format_bytes(available)} of memory available (with aggregator "
            f"{_aggregator_names(method)}); tile the slide coarser or split it"
        )


def _aggregator_names(method: nn.Module) -> str:
    kinds = {
        type(m).__name__
        for m in method.modules()
        if isinstance(m, GatedAttentionMIL | MeanPoolMIL | TransMIL)
    }
    return ", ".join(sorted(kinds)) or "none"


class BoundedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Bags sorted by size (as ``LengthBucketSampler`` does for prediction), cut into batches of
    at most ``batch_size`` bags and ``max_bytes`` of padded float32 input."""

    def __init__(self, lengths: Sequence[int], batch_size: int, dim: int, max_bytes: int):
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.int64)
        self.batch_size, self.dim, self.max_bytes = batch_size, dim, max_bytes
        self._batches = self._cut()

    def _cut(self) -> list[list[int]]:
        order = torch.argsort(self.lengths, stable=True).tolist()
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            padded = (len(current) + 1) * max(int(self.lengths[i]), 1) * self.dim * 4
            if current and (len(current) == self.batch_size or padded > self.max_bytes):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        yield from (list(b) for b in self._batches)


def prediction_loader(
    dataset,
    batch_size: int,
    *,
    method: nn.Module,
    dim: int,
    names: Sequence[str] | None = None,
    max_bytes: int = BATCH_BYTES,
) -> DataLoader:
    """A loader over whole bags in size order with bounded batches, after the memory check.

    Iterate ``loader.batch_sampler`` beside the loader to know which bags each batch holds.
    """
    lengths = dataset.lengths()
    check_prediction_memory(method, lengths, dim, names)
    sampler = BoundedBatchSampler(lengths, batch_size, dim, max_bytes)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_bags, num_workers=0)
