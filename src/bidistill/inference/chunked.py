"""Whole-bag prediction in bounded memory: a bag's instances are encoded chunk by chunk.

A MIL aggregator spends its memory per instance (the projection D → H and the attention layers);
only the softmax over the instances couples them. So a bag is read in chunks of rows sized to a
memory budget, each chunk is projected and scored, and the chunks are combined with an online
softmax (a running maximum and rescaled sums, Milakov & Gimelshein 2018, as in FlashAttention).
The embedding equals the whole-bag one up to float rounding, while the memory grows with the
chunk, not with the bag; per instance only the attention score is kept (4 bytes).

The method itself then runs unchanged: each aggregator module is swapped for one that returns
the streamed result, so BD's two branches, ``switch``, ``kd`` and any new method predict without
code of their own. An aggregator that cannot be streamed (TransMIL: its self-attention couples
every pair of instances) runs on the whole bag when an estimate of its memory fits the budget,
and is refused with a clear error otherwise.

The budget covers what grows with the bag: the features as read, their activations and the
per-instance scores; not the model's weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from bidistill.errors import BidistillError, FeatureFileError
from bidistill.features.hygiene import check_values
from bidistill.models import aggregators as _aggregators
from bidistill.models.aggregators import Aggregate, TransMIL
from bidistill.models.batch import Batch, Output
from bidistill.models.streaming import PoolStream, streams

MiB = 2**20
DEFAULT_MEMORY_BUDGET = 512 * MiB
_FLOAT = 4  # bytes per float32


class BagTooLargeError(BidistillError, MemoryError):
    """A bag that cannot be predicted within the memory budget; the message says what to do."""


# --- bag sources --------------------------------------------------------------------------------


class BagSource(Protocol):
    """A bag that can be read in chunks of rows: features [n, D]."""

    n_instances: int
    dim: int

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        """Consecutive blocks of at most ``rows`` instances, float16 or float32 [r, D]."""


class ArrayBag:
    """A bag already in memory."""

    def __init__(self, features: np.ndarray):
        features = np.asarray(features)
        if features.ndim != 2:
            raise ValueError(f"a bag must be [n, D], got shape {features.shape}")
        self.features = features
        self.n_instances, self.dim = features.shape

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        for start in range(0, self.n_instances, rows):
            yield self.features[start : start + rows]


class FileBag:
    """A patient's bag: its slides' ``.h5`` feature files, in order, read a chunk at a time.

    Only the file headers are read here; ``chunks`` reads row slices of ``features`` (CLAM's
    older ``[1, n, D]`` layout included).

    Raises:
        FeatureFileError: a file is missing or not a feature file, or the files disagree on D.
    """

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = [Path(p) for p in paths]
        self.lengths: list[int] = []
        dims = set()
        for path in self.paths:
            shape = _features_shape(path)
            self.lengths.append(shape[-2])
            dims.add(shape[-1])
        if len(dims) > 1:
            raise FeatureFileError(
                f"{', '.join(map(str, self.paths))}: the slides' feature files have different "
                f"dimensions {sorted(dims)}; extract every slide with the same encoder"
            )
        self.dim = dims.pop() if dims else 0
        self.n_instances = sum(self.lengths)

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        """Row blocks read into one buffer that every block reuses: a block is valid until the
        next one is asked for (so two blocks never sit in memory at once)."""
        buffer: np.ndarray | None = None
        for path in self.paths:
            with h5py.File(path, "r") as h5:
                dataset = h5["features"]
                n = dataset.shape[-2]
                if buffer is None or buffer.dtype != dataset.dtype:
                    buffer = np.empty((min(rows, max(n, 1)), self.dim), dtype=dataset.dtype)
                for start in range(0, n, rows):
                    stop = min(start + rows, n)
                    if stop - start > len(buffer):
                        buffer = np.empty((stop - start, self.dim), dtype=dataset.dtype)
                    block = buffer[: stop - start]
                    where = np.s_[0, start:stop] if dataset.ndim == 3 else np.s_[start:stop]
                    dataset.read_direct(block, source_sel=where)
                    # NaN would pass the aggregators and surface as a NaN probability.
                    check_values(path, block, first_row=start)
                    yield block


def _features_shape(path: Path) -> tuple[int, ...]:
    if not path.is_file():
        raise FeatureFileError(f"{path}: feature file not found")
    try:
        with h5py.File(path, "r") as h5:
            shape = tuple(h5["features"].shape)
    except (OSError, KeyError) as err:
        raise FeatureFileError(f"{path}: not a readable feature file ({err})") from err
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != 1):
        raise FeatureFileError(f"{path}: 'features' must be [n, D], got {shape}")
    return shape


# --- streaming aggregators ----------------------------------------------------------------------


class _WholeBag:
    """Any other aggregator: the chunks are joined and the module runs on the whole bag."""

    def __init__(self, module: nn.Module, dim: int):
        self.module = module
        self.dim = dim
        self.parts: list[Tensor] = []

    def update(self, x: Tensor, valid: Tensor) -> None:
        self.parts.append(x)

    def result(self) -> Aggregate:
        bag = torch.cat(self.parts, dim=1) if self.parts else torch.zeros(1, 0, self.dim)
        return self.module(bag, torch.ones(bag.shape[:2], dtype=torch.bool, device=bag.device))


def _stream(module: nn.Module, n_instances: int, dim: int) -> PoolStream | _WholeBag:
    return PoolStream(module, n_instances) if streams(module) else _WholeBag(module, dim)


def whole_bag_bytes(module: nn.Module, n: int, dim: int) -> int:
    """Estimated memory of running a non-streaming aggregator on a bag of ``n`` instances."""
    hidden = getattr(module, "out_dim", 128)
    per_instance = _FLOAT * (2 * dim + 12 * hidden)
    if isinstance(module, TransMIL):
        heads = module.attentions[0].num_heads if len(module.attentions) else 1
        # the attention matrices of one layer: per head inside PyTorch, plus their average
        return per_instance * n + _FLOAT * (heads + 1) * (n + 1) ** 2
    return per_instance * n


# --- the aggregators of a method ----------------------------------------------------------------


def find_aggregators(method: nn.Module) -> dict[str, nn.Module]:
    """The MIL aggregators of a method by module path (e.g. ``aggregator_multi``,
    ``wsi.aggregator``), outermost only, in registration order."""
    found: dict[str, nn.Module] = {}
    for name, module in method.named_modules():
        if any(name.startswith(f"{outer}.") for outer in found):
            continue
        if type(module).__module__ == _aggregators.__name__ and hasattr(module, "out_dim"):
            found[name] = module
    return found


def chunk_rows(
    method: nn.Module, n_instances: int, dim: int, memory_budget: int
) -> tuple[int, int]:
    """Rows per chunk for ``method`` on a bag of ``n_instances`` within ``memory_budget`` bytes.

    Returns:
        (rows per chunk, bytes the per-instance results take whatever the chunk).

    Raises:
        BagTooLargeError: the budget cannot hold even the per-instance results, or an
            aggregator that cannot be streamed needs more than the budget for this bag.
    """
    found = find_aggregators(method)
    for name, module in found.items():
        if streams(module):
            continue
        need = whole_bag_bytes(module, n_instances, dim)
        if need > memory_budget:
            raise BagTooLargeError(
                f"a bag of {n_instances} tiles needs about {need / MiB:,.0f} MiB in "
                f"{type(module).__name__} ({name}), which sees every tile at once; the memory "
                f"budget is {memory_budget / MiB:,.0f} MiB. Raise it (--memory-budget), or train "
                "with `aggregator: abmil` or `mean`, which predict in bounded memory"
            )
    # Per instance, whatever the chunk: each aggregator's scores and attention, the routed copy.
    fixed = _FLOAT * n_instances * (2 * len(found) + 1)
    hidden = max((getattr(m, "out_dim", 0) for m in found.values()), default=0)
    # The chunk as read (float16 or float32) and as float32, and one aggregator's activations
    # (projection, ReLU, gated attention: about 4.5 H floats; 8 H leaves room).
    per_row = _FLOAT * (2 * dim + 8 * hidden)
    available = memory_budget - fixed
    if available < per_row:
        raise BagTooLargeError(
            f"a memory budget of {memory_budget / MiB:,.1f} MiB cannot hold the attention scores "
            f"of a bag of {n_instances} tiles ({fixed / MiB:,.1f} MiB); raise --memory-budget"
        )
    return max(1, available // per_row), fixed


@dataclass
class BagOutput:
    """One bag's prediction.

    Attributes:
        probability: P(label = 1).
        attention: per aggregator path, the instance weights [n] (empty without aggregators).
        routed: the aggregator whose weights the prediction used (None for methods without a
            bag, e.g. clinical-only).
        chunk_rows: the most instances encoded at once.
    """

    probability: float
    attention: dict[str, np.ndarray]
    routed: str | None
    chunk_rows: int


@torch.no_grad()
def encode_bag(
    method: nn.Module,
    bag: BagSource,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, Aggregate], int]:
    """Every aggregator's result on ``bag``, reading it once, a chunk at a time.

    Returns:
        (aggregator path → Aggregate with embedding [1, H] and attention [1, n], rows per chunk).
    """
    found = find_aggregators(method)
    if not found:
        return {}, 0
    rows, _ = chunk_rows(method, bag.n_instances, bag.dim, memory_budget)
    pools = {name: _stream(module, bag.n_instances, bag.dim) for name, module in found.items()}
    device = torch.device(device)
    valid = torch.ones(1, rows, dtype=torch.bool, device=device)
    for chunk in bag.chunks(rows):
        x = torch.from_numpy(np.ascontiguousarray(chunk)).to(device=device, dtype=torch.float32)
        for stream in pools.values():
            stream.update(x[None], valid[:, : len(x)])
        del x
    return {name: stream.result() for name, stream in pools.items()}, rows


class _Replay(nn.Module):
    """Stands in for an aggregator: returns the result computed by ``encode_bag``."""

    def __init__(self, aggregate: Aggregate, out_dim: int):
        super().__init__()
        self.aggregate = aggregate
        self.out_dim = out_dim

    def forward(self, bags: Tensor, tile_valid: Tensor) -> Aggregate:
        return self.aggregate


@contextlib.contextmanager
def _replayed(method: nn.Module, aggregates: dict[str, Aggregate]) -> Iterator[None]:
    originals = {}
    for name, aggregate in aggregates.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = method.get_submodule(parent_name)
        originals[name] = (parent, leaf, getattr(parent, leaf))
        setattr(parent, leaf, _Replay(aggregate, getattr(originals[name][2], "out_dim", 0)))
    try:
        yield
    finally:
        for parent, leaf, module in originals.values():
            setattr(parent, leaf, module)


@torch.no_grad()
def predict_bag(
    method: nn.Module,
    bag: BagSource,
    clinical: Tensor,
    clinical_valid: Tensor,
    clinical_present: bool,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: str | torch.device = "cpu",
) -> BagOutput:
    """Predict one patient from its whole bag in bounded memory (the method in eval mode).

    Args:
        method: a trained method (``load_trained``), already on ``device``.
        bag: the patient's instances.
        clinical: the encoded clinical row [C]; clinical_valid: [F]; clinical_present: routes.
        memory_budget: bytes for what grows with the bag (see the module docstring).
    """
    method.eval()
    device = torch.device(device)
    aggregates, rows = encode_bag(method, bag, memory_budget=memory_budget, device=device)
    # NaN features: a method that read the bag anywhere but through its aggregators would
    # return NaN instead of a wrong number.
    batch = Batch(
        bags=torch.full((1, 1, max(bag.dim, 1)), math.nan, device=device),
        tile_valid=torch.ones(1, 1, dtype=torch.bool, device=device),
        clinical=clinical.reshape(1, -1).to(device=device, dtype=torch.float32),
        clinical_valid=clinical_valid.reshape(1, -1).to(device=device, dtype=torch.bool),
        clinical_present=torch.tensor([bool(clinical_present)], device=device),
    )
    with _replayed(method, aggregates):
        output: Output = method(batch)
    probability = float(output.probabilities.float().cpu()[0])
    if not math.isfinite(probability):
        raise RuntimeError(
            f"{type(method).__name__} reads the bag outside its aggregators, which chunked "
            "prediction cannot serve"
        )
    attention = {name: a.attention[0].float().cpu().numpy() for name, a in aggregates.items()}
    return BagOutput(probability, attention, _routed(output, aggregates), rows)


def _routed(output: Output, aggregates: dict[str, Aggregate]) -> str | None:
    """The aggregator whose weights the output carries (they are routed, not recomputed)."""
    if output.attention is None:
        return None
    for name, aggregate in aggregates.items():
        if aggregate.attention.shape == output.attention.shape and torch.equal(
            aggregate.attention, output.attention
        ):
            return name
    return None
