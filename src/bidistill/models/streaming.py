"""Prediction in bounded memory, for bags of any size: the one engine of training's
predictions, ``predict``, ``heatmap`` and ``load_run``.

``PoolStream`` projects and scores a bag a chunk at a time with an online softmax (Milakov &
Gimelshein 2018, as in FlashAttention): the embedding equals the whole-bag one up to float
rounding, and per instance only the attention score is kept. TransMIL attends between
instances: it runs on the whole bag when it fits the budget, else ``BagTooLargeError``. Each
aggregator is encoded once per bag and its result replayed into the method's unchanged forward,
so every method predicts without code of its own, and one encoding serves clinical data given
and withheld."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from bidistill.errors import BidistillError
from bidistill.models import aggregators as _aggregators
from bidistill.models.aggregators import (
    SUM_SCALE,
    Aggregate,
    GatedAttentionMIL,
    MeanPoolMIL,
    TransMIL,
)
from bidistill.models.batch import Batch, Output

MiB = 2**20
DEFAULT_MEMORY_BUDGET = 512 * MiB
_FLOAT = 4  # bytes per float32


class BagTooLargeError(BidistillError, MemoryError):
    """A bag that cannot be predicted within the memory at hand; the message says what to do."""


def streams(module: nn.Module) -> bool:
    """Whether ``PoolStream`` can run ``module`` (others need the whole bag at once)."""
    return type(module) in (GatedAttentionMIL, MeanPoolMIL)


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


@contextlib.contextmanager
def _answering(modules: dict[nn.Module, Callable]) -> Iterator[None]:
    """Within the block each module's ``forward`` is the one given (an instance attribute,
    which shadows the class's method; removed afterwards)."""
    for module, forward in modules.items():
        module.forward = forward
    try:
        yield
    finally:
        for module in modules:
            del module.forward


class PoolStream:
    """Feed ``update(chunk, valid)`` with [B, c, D] instances and their [B, c] validity, then
    ``result()`` gives the module's ``Aggregate`` for the whole bags. Eval mode and no gradients
    (the buffers are updated in place); the layers are applied by their weights, so forward
    hooks on them do not fire.

    Nothing is allocated per chunk (buffers of ``n_instances`` allocated once, activations in
    reused buffers): tensors allocated per chunk fragmented the heap, and the process grew with
    the number of chunks (256 MiB for 1M tiles at a 64 MiB budget) instead of one chunk's worth.
    """

    def __init__(self, module: nn.Module, n_instances: int):
        if not streams(module):
            raise TypeError(f"{type(module).__name__} cannot pool in chunks")
        self.module = module
        self.n_instances = n_instances
        self.attention = isinstance(module, GatedAttentionMIL)
        self.with_mean = not self.attention or module.with_mean
        self.summing = self.attention and module.gate != "softmax"  # no softmax: no running max
        self.additive = self.attention and module.gate == "additive"
        self.counting = module.with_count
        self.seen = 0  # instances fed so far
        self.scores: Tensor | None = None  # attention: [B, n], -inf on padding
        self.valid: Tensor | None = None  # [B, n]
        self.running_max: Tensor | None = None  # [B, 1]
        self.total: Tensor | None = None  # Σ exp(s - max), [B, 1]
        self.gated: Tensor | None = None  # Σ sigmoid(s), [B, 1] (abmil-sum, abmil-count)
        self.weighted: Tensor | None = None  # Σ exp(s - max) h, [B, H]
        self.summed: Tensor | None = None  # Σ h over valid instances, [B, H]
        self.count: Tensor | None = None  # valid instances, [B, 1]
        self.activations: dict[str, Tensor] = {}  # layer name → [rows, out], reused

    @torch.no_grad()
    def update(self, chunk: Tensor, valid: Tensor) -> None:
        m = self.module
        batch, width = chunk.shape[:2]
        h = self._sequential("project", m.project, chunk.reshape(batch * width, -1))
        h = h.view(batch, width, -1)  # [B, c, H]
        if self.running_max is None:
            self._allocate(h)
        at = slice(self.seen, self.seen + h.shape[1])
        if at.stop > self.n_instances:
            raise ValueError(f"more than the {self.n_instances} instances announced")
        self.seen = at.stop
        self.valid[:, at] = valid
        if self.with_mean:
            mask = valid.to(h.dtype)
            self.summed.add_(torch.einsum("bc,bch->bh", mask, h))
            self.count.add_(mask.sum(dim=1, keepdim=True))
        if not self.attention:
            return
        flat = h.view(batch * width, -1)
        gate = self._linear("v", m.attention_v, flat).tanh_()
        gate.mul_(self._linear("u", m.attention_u, flat).sigmoid_())
        s = self.scores[:, at]
        s.copy_(self._linear("w", m.attention_w, gate).view(batch, width))
        s.masked_fill_(~valid, float("-inf"))  # [B, c]
        if self.summing or self.counting:  # padding: sigmoid(-inf) = 0
            gates = torch.sigmoid(s)
            self.gated.add_(gates.sum(dim=1, keepdim=True))
        if self.additive:  # the scores' buffer keeps each instance's contribution instead
            evidence = self._linear("e", m.evidence, flat).view(batch, width)
            s.copy_(gates).mul_(evidence).div_(SUM_SCALE)
            self.weighted[:, :1].add_(s.sum(dim=1, keepdim=True))
            return
        if self.summing:
            self.weighted.add_(torch.einsum("bc,bch->bh", gates, h))
            return
        new_max = torch.maximum(self.running_max, s.max(dim=1, keepdim=True).values)
        shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        rescale = torch.exp(self.running_max - shift)  # exp(-inf) = 0 before the first score
        weights = torch.exp(s - shift)  # padding: exp(-inf) = 0
        self.weighted.mul_(rescale).add_(torch.einsum("bc,bch->bh", weights, h))
        self.total.mul_(rescale).add_(weights.sum(dim=1, keepdim=True))
        self.running_max = new_max

    def _linear(self, name: str, layer: nn.Linear, x: Tensor) -> Tensor:
        """``layer(x)`` for x [r, in], written into the reused buffer ``name`` [r, out]."""
        buffer = self.activations.get(name)
        if buffer is None or len(buffer) < len(x):
            buffer = self.activations[name] = x.new_empty(len(x), layer.out_features)
        out = buffer[: len(x)]
        if layer.bias is None:
            return torch.mm(x, layer.weight.t(), out=out)
        return torch.addmm(layer.bias, x, layer.weight.t(), out=out)

    def _sequential(self, name: str, layers: nn.Sequential, x: Tensor) -> Tensor:
        """``layers(x)`` in eval mode, linear layers into reused buffers, ReLU in place."""
        for index, layer in enumerate(layers):
            if isinstance(layer, nn.Linear):
                x = self._linear(f"{name}.{index}", layer, x)
            elif isinstance(layer, nn.ReLU):
                x = x.relu_() if index else torch.relu(x)  # never the caller's input in place
            elif not isinstance(layer, nn.Dropout):  # dropout: identity in eval mode
                x = layer(x)
        return x

    def _allocate(self, h: Tensor) -> None:
        batch, width = h.shape[0], h.shape[-1]
        zeros = h.new_zeros
        self.running_max = torch.full((batch, 1), float("-inf"), dtype=h.dtype, device=h.device)
        self.total, self.count, self.gated = zeros(batch, 1), zeros(batch, 1), zeros(batch, 1)
        self.weighted, self.summed = zeros(batch, width), zeros(batch, width)
        self.valid = torch.zeros(batch, self.n_instances, dtype=torch.bool, device=h.device)
        if self.attention:
            self.scores = torch.full(
                (batch, self.n_instances), float("-inf"), dtype=h.dtype, device=h.device
            )

    @torch.no_grad()
    def result(self, batch: int = 1) -> Aggregate:
        """The bags' aggregate; ``batch`` sizes the zero result of a stream that saw nothing.

        The attention weights are computed in the scores' own buffer (the stream is spent)."""
        if self.running_max is None:  # no chunk at all: as the module gives an empty bag
            return Aggregate(torch.zeros(batch, self.module.out_dim), torch.zeros(batch, 0))
        if self.seen != self.n_instances:
            raise ValueError(f"{self.seen} instances fed, {self.n_instances} announced")
        mean = self.summed / self.count.clamp_min(1.0)  # an empty bag keeps a zero embedding
        if not self.attention:
            weights = self.valid.to(mean.dtype) / self.count.clamp_min(1.0)
            if not self.counting:
                return Aggregate(mean, weights)
            # mean-count: the log of the bag's size
            return Aggregate(torch.cat([mean, torch.log1p(self.count)], dim=-1), weights)
        tiny = torch.finfo(self.total.dtype).tiny
        if self.additive:
            return Aggregate(self.weighted[:, :1].clone(), self.scores)
        if self.summing:
            weights = self.scores.sigmoid_().div_(self.gated.clamp_min(tiny))
            return Aggregate(self.weighted / SUM_SCALE, weights)
        pooled = self.weighted / self.total.clamp_min(tiny)
        embedding = torch.cat([pooled, mean], dim=-1) if self.with_mean else pooled
        if self.counting:
            embedding = torch.cat([embedding, torch.log1p(self.gated)], dim=-1)
        # softmax = exp(s - max) / Σ exp(s - max), from the running max and sum: padding and
        # empty bags (max -inf) give exp(-inf) = 0, as masked_softmax does.
        shift = torch.where(torch.isfinite(self.running_max), self.running_max, 0.0)
        weights = self.scores.sub_(shift).exp_().div_(self.total.clamp_min(tiny))
        return Aggregate(embedding, weights)


# --- one bag read a chunk at a time -------------------------------------------------------------


class ChunkedBag(Protocol):
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


class _WholeBag:
    """Any other aggregator: the chunks are joined and the module runs on the whole bag."""

    def __init__(self, module: nn.Module, dim: int):
        self.module, self.dim = module, dim
        self.parts: list[Tensor] = []
        self.valid: list[Tensor] = []

    def update(self, x: Tensor, valid: Tensor) -> None:
        self.parts.append(x)
        self.valid.append(valid)

    def result(self) -> Aggregate:
        if not self.parts:
            bag = torch.zeros(1, 0, self.dim)
            return self.module(bag, torch.ones(1, 0, dtype=torch.bool))
        return self.module(torch.cat(self.parts, dim=1), torch.cat(self.valid, dim=1))


def whole_bag_bytes(module: nn.Module, n: int, dim: int) -> int:
    """Estimated memory of running a non-streaming aggregator on a bag of ``n`` instances."""
    hidden = getattr(module, "out_dim", 128)
    per_instance = _FLOAT * (2 * dim + 12 * hidden)
    if isinstance(module, TransMIL):
        heads = module.attentions[0].num_heads if len(module.attentions) else 1
        # the attention matrices of one layer: per head inside PyTorch, plus their average
        return per_instance * n + _FLOAT * (heads + 1) * (n + 1) ** 2
    return per_instance * n


def chunk_rows(
    method: nn.Module,
    n_instances: int,
    dim: int,
    memory_budget: int,
    more_memory: str = "raise --memory-budget",
) -> tuple[int, int]:
    """(rows per chunk, bytes of the per-instance results) for ``method`` on a bag of
    ``n_instances`` within ``memory_budget`` bytes (what grows with the bag, not the weights);
    ``BagTooLargeError`` when not even the per-instance results, or a bag that an aggregator
    needs whole, fit; ``more_memory`` says how the caller's user gives it more."""
    found = find_aggregators(method)
    for name, module in found.items():
        need = 0 if streams(module) else whole_bag_bytes(module, n_instances, dim)
        if need > memory_budget:
            raise BagTooLargeError(
                f"a bag of {n_instances} tiles needs about {need / MiB:,.0f} MiB in "
                f"{type(module).__name__} ({name}), which sees every tile at once; the memory "
                f"budget is {memory_budget / MiB:,.0f} MiB. {more_memory.capitalize()}, or train "
                "with `aggregator: abmil` or `mean`, which predict in bounded memory"
            )
    # Per instance, whatever the chunk: each aggregator's scores and attention, the routed copy.
    fixed = _FLOAT * n_instances * (2 * len(found) + 1)
    hidden = max((getattr(m, "out_dim", 0) for m in found.values()), default=0)
    # The chunk as read (float16 or float32) and as float32, and one aggregator's activations
    # (projection, ReLU, gated attention: about 4.5 H floats, and H more for each further
    # instance layer, 7.5 H at the most of four; 8 H leaves room).
    per_row = _FLOAT * (2 * dim + 8 * hidden)
    if not per_row:  # nothing is read per instance (a clinical-only cohort: no bags at all)
        return max(1, n_instances), fixed
    available = memory_budget - fixed
    if available < per_row:
        raise BagTooLargeError(
            f"a memory budget of {memory_budget / MiB:,.1f} MiB cannot hold the attention scores "
            f"of a bag of {n_instances} tiles ({fixed / MiB:,.1f} MiB); {more_memory}"
        )
    return max(1, available // per_row), fixed


@dataclass
class BagOutput:
    """One bag's prediction."""

    probability: float | np.ndarray  # P(label = 1); K > 2 classes: each class's [K]
    attention: dict[str, np.ndarray]  # aggregator path → instance weights [n] (or effects)
    routed: str | None  # the aggregator whose weights it used (None: no bag, clinical-only)
    chunk_rows: int  # the most instances encoded at once


@torch.no_grad()
def encode_bag(
    method: nn.Module,
    bag: ChunkedBag,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, Aggregate], int]:
    """(aggregator path → its ``Aggregate`` [1, H] / [1, n], rows per chunk) on ``bag``, read
    once, a chunk at a time."""
    found = find_aggregators(method)
    if not found:
        return {}, 0
    rows, _ = chunk_rows(method, bag.n_instances, bag.dim, memory_budget)
    pools = stream_bag(found, bag, rows, device)
    return {name: stream.result() for name, stream in pools.items()}, rows


@torch.no_grad()
def stream_bag(
    aggregators: dict[str, nn.Module],
    bag: ChunkedBag,
    rows: int,
    device: str | torch.device = "cpu",
    *,
    without: int | None = None,
) -> dict[str, PoolStream | _WholeBag]:
    """Each aggregator's stream fed ``bag``, read once in chunks of ``rows`` (``without``: an
    instance left out, marked invalid); their ``result()`` is the aggregate."""
    pools = {
        name: PoolStream(m, bag.n_instances) if streams(m) else _WholeBag(m, bag.dim)
        for name, m in aggregators.items()
    }
    device = torch.device(device)
    every = torch.ones(1, rows, dtype=torch.bool, device=device)
    start = 0
    for chunk in bag.chunks(rows):
        x = torch.from_numpy(np.ascontiguousarray(chunk)).to(device=device, dtype=torch.float32)
        valid = every[:, : len(x)]
        if without is not None and start <= without < start + len(x):
            valid = valid.clone()
            valid[0, without - start] = False
        for stream in pools.values():
            stream.update(x[None], valid)
        start += len(x)
        del x
    return pools


@torch.no_grad()
def predict_bag(
    method: nn.Module,
    bag: ChunkedBag,
    clinical: Tensor,
    clinical_valid: Tensor,
    clinical_present: bool,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: str | torch.device = "cpu",
) -> BagOutput:
    """Predict one patient (encoded clinical row [C], its validity [F], presence) from its
    whole bag in bounded memory (``memory_budget``: bytes for what grows with the bag)."""
    method.eval()
    encoded = encode_bag(method, bag, memory_budget=memory_budget, device=device)
    return predict_encoded(method, encoded, bag.dim, clinical, clinical_valid, clinical_present)


@torch.no_grad()
def predict_encoded(
    method: nn.Module,
    encoded: tuple[dict[str, Aggregate], int],
    dim: int,
    clinical: Tensor,
    clinical_valid: Tensor,
    clinical_present: bool,
) -> BagOutput:
    """The method's prediction from its aggregators' results on a bag (``encode_bag``), in
    eval mode on the aggregates' device; ``dim`` is the bag's instance dimension."""
    aggregates, rows = encoded
    output = replay(method, aggregates, dim, clinical, clinical_valid, clinical_present)
    scores = output.probabilities.float().cpu().numpy()[0]
    probability = float(scores) if scores.ndim == 0 else scores
    if not np.isfinite(scores).all():
        raise RuntimeError(
            f"{type(method).__name__} reads the bag outside its aggregators, which chunked "
            "prediction cannot serve"
        )
    attention = {name: a.attention[0].float().cpu().numpy() for name, a in aggregates.items()}
    routed = routed_aggregator(output.attention, {n: a.attention for n, a in aggregates.items()})
    return BagOutput(probability, attention, routed, rows)


def replay(
    method: nn.Module,
    aggregates: dict[str, Aggregate],
    dim: int,
    clinical: Tensor,
    clinical_valid: Tensor,
    clinical_present: bool,
) -> Output:
    """The method's unchanged ``forward`` with each aggregator answering its given aggregate
    (a batch of the aggregates' rows, one clinical row for all of them), on the method's
    device; ``dim`` is the bag's instance dimension."""
    rows = len(next(iter(aggregates.values())).embedding) if aggregates else 1
    device = next(method.parameters()).device
    # NaN features: a method that read the bag anywhere but through its aggregators would
    # return NaN instead of a wrong number.
    batch = Batch(
        bags=torch.full((1, 1, max(dim, 1)), math.nan, device=device).expand(rows, 1, -1),
        tile_valid=torch.ones(rows, 1, dtype=torch.bool, device=device),
        clinical=clinical.reshape(1, -1).to(device, torch.float32).expand(rows, -1),
        clinical_valid=clinical_valid.reshape(1, -1).to(device, torch.bool).expand(rows, -1),
        clinical_present=torch.full((rows,), bool(clinical_present), device=device),
    )
    found = find_aggregators(method)
    replayed = {found[name]: (lambda *_, a=a: a) for name, a in aggregates.items()}
    with _answering(replayed):
        return method(batch)


def routed_aggregator(attention: Tensor | None, candidates: dict[str, Tensor]) -> str | None:
    """The aggregator whose weights an output carries (they are routed, not recomputed), among
    each aggregator's attention by path."""
    if attention is None:
        return None
    for name, weights in candidates.items():
        if weights.shape == attention.shape and torch.equal(weights, attention):
            return name
    return None
