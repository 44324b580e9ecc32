"""Leave-one-out effects: for every tile, what a branch's log-odds loses when the tile is left
out of the bag, exactly and in bounded memory (``bidistill heatmap --score leave-one-out``).

Attention shows where a pooling looked, which need not be what the prediction rests on: on the
heatmap test's cohort the same model's attention moves from the planted key instances to none
between training seeds while its predictions rest on them every time
(benchmarks/accuracy/faithfulness.py). A tile's effect is the model's own answer: the branch's
log-odds of the positive class (K > 2 classes: of the class the branch predicts) for the whole
bag minus that for the bag without the tile. Positive: the tile pushes toward that class.

Masking each tile in turn costs N + 1 passes over the bag. For the streamed poolings this
costs two: the first (``stream_bag``) gives the sums the embedding is made of; the second
recomputes each tile's projection h_k and score s_k a chunk at a time and takes the tile out of
the sums in closed form (in float64: equal to masking to float rounding)

    softmax pooling  (Σ e_j h_j − e_k h_k) / (Σ e_j − e_k),  e_j = exp(s_j − max)
    mean             (Σ h_j − h_k) / (n − 1)
    count            log(1 + Σ g_j − g_k),                   g_j = sigmoid(s_j)
    bag size         log(1 + n − 1)                          (mean-count)
    sigmoid sum      (Σ g_j h_j − g_k h_k) / SUM_SCALE
    additive         z − c_k.

A tile holding over half of a softmax's weight (one at most) would cancel in the first form, so
it gets a third pass with the tile masked. Each chunk's embeddings are replayed through the
method's unchanged forward (``streaming.replay``, as ``predict_encoded`` does), so every method
gets these effects without code of its own. An aggregator that sees the whole bag at once
(TransMIL) is run once per tile with the tile masked (N passes over the bag in memory).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from bidistill.models.aggregators import SUM_SCALE, Aggregate, GatedAttentionMIL
from bidistill.models.streaming import (
    DEFAULT_MEMORY_BUDGET,
    BagOutput,
    ChunkedBag,
    PoolStream,
    chunk_rows,
    find_aggregators,
    predict_encoded,
    replay,
    stream_bag,
    streams,
)


@torch.no_grad()
def leave_one_out(
    method: nn.Module,
    bag: ChunkedBag,
    clinical: Tensor,
    clinical_valid: Tensor,
    clinical_present: bool,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: str | torch.device = "cpu",
) -> BagOutput:
    """``predict_bag``'s prediction, with each aggregator's leave-one-out effects [n] in place
    of its attention. Each branch is asked on the route that uses it: the patient's clinical
    row as given, or, for the branch of the other route (BD's WSI-only branch for a patient
    with clinical data), the same row with its presence flipped."""
    method.eval()
    found = find_aggregators(method)
    rows, _ = chunk_rows(method, bag.n_instances, bag.dim, memory_budget)
    pools = stream_bag(found, bag, rows, device)
    aggregates = {name: pool.result() for name, pool in pools.items()}
    output = predict_encoded(
        method, (aggregates, rows), bag.dim, clinical, clinical_valid, clinical_present
    )
    effects = {}
    for name, module in found.items():
        branch = _route_of(
            name, method, aggregates, bag.dim, clinical, clinical_valid, clinical_present
        )
        whole = branch.log_odds({})
        without = _without_each(name, module, pools[name], aggregates[name], bag, rows, branch)
        effects[name] = (whole - without).cpu().numpy()
    return BagOutput(output.probability, effects, output.routed, rows)


class _Replay:
    """The method's log-odds with one aggregator's embeddings replaced (a row each) and the
    others' whole-bag aggregates, for one clinical row on one route (``present``)."""

    def __init__(self, method, aggregates, dim, clinical, clinical_valid, present: bool):
        self.method, self.aggregates, self.dim = method, aggregates, dim
        self.clinical, self.clinical_valid, self.present = clinical, clinical_valid, present
        self.device = next(method.parameters()).device
        whole = self.logits({})
        self.target = 1 if whole.shape[-1] == 2 else int(whole[0].argmax())

    def logits(self, replaced: dict[str, Tensor]) -> Tensor:
        rows = len(next(iter(replaced.values()))) if replaced else 1
        answers = {
            name: Aggregate(
                replaced.get(name, whole.embedding.expand(rows, -1)).to(self.device, torch.float32),
                torch.zeros(rows, 1),
            )
            for name, whole in self.aggregates.items()
        }
        output = replay(
            self.method, answers, self.dim, self.clinical, self.clinical_valid, self.present
        )
        return output.logits.double()

    def log_odds(self, replaced: dict[str, Tensor]) -> Tensor:
        """[rows]: log p_t / (1 − p_t) of the target class t."""
        logits, t = self.logits(replaced), self.target
        others = torch.cat([logits[:, :t], logits[:, t + 1 :]], dim=1)
        return logits[:, t] - torch.logsumexp(others, dim=1)


def _route_of(name, method, aggregates, dim, clinical, clinical_valid, present) -> _Replay:
    """The replay on the route whose output depends on aggregator ``name``: the patient's own
    (``present``), else the other."""
    replays = [
        _Replay(method, aggregates, dim, clinical, clinical_valid, route)
        for route in (present, not present)
    ]
    for candidate in replays:
        moved = candidate.logits({name: aggregates[name].embedding + 1.0})
        if not torch.equal(moved, candidate.logits({})):
            return candidate
    return replays[0]


def _without_each(name, module, pool, whole: Aggregate, bag, rows, branch: _Replay) -> Tensor:
    """[n] the branch's log-odds with the aggregator's embedding of the bag without each
    instance in turn."""
    if not streams(module):  # the whole bag is in the pool: mask one instance at a time
        x = torch.cat(pool.parts, dim=1)
        keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        out = []
        for k in range(x.shape[1]):
            keep[0, k] = False
            out.append(branch.log_odds({name: module(x, keep).embedding}))
            keep[0, k] = True
        return _joined(out)
    out = []
    for chunk in bag.chunks(rows):
        x = torch.from_numpy(np.ascontiguousarray(chunk)).to(branch.device, torch.float32)
        out.append(branch.log_odds({name: _embeddings_without(module, pool, x)}))
    effects = _joined(out)
    dominant = _dominant_instance(module, whole)
    if dominant is not None:  # the closed form would cancel: mask it instead
        masked = stream_bag({name: module}, bag, rows, branch.device, without=dominant)
        effects[dominant] = branch.log_odds({name: masked[name].result().embedding})[0]
    return effects


def _joined(effects: list[Tensor]) -> Tensor:
    """The per-chunk (or per-tile) log-odds in one [n] float64 tensor; an empty bag gives []."""
    return torch.cat(effects) if effects else torch.zeros(0, dtype=torch.float64)


def _dominant_instance(module: nn.Module, whole: Aggregate) -> int | None:
    """The instance holding over half of a softmax pooling's weight, if any."""
    if not isinstance(module, GatedAttentionMIL) or module.gate != "softmax":
        return None
    weights = whole.attention[0]
    if not len(weights):
        return None
    k = int(weights.argmax())
    return k if float(weights[k]) > 0.5 else None


def _embeddings_without(module: nn.Module, pool: PoolStream, x: Tensor) -> Tensor:
    """[c, H'] float64: the aggregator's embedding of the whole bag without each of the chunk's
    c instances ``x`` [c, D] in turn, from the stream's sums (module docstring)."""
    projected = module.project(x)  # [c, H], float32 as the first pass computed it
    h = projected.double()
    n = pool.count.double()  # [1, 1]
    mean = (pool.summed.double() - h) / (n - 1).clamp_min(1.0)
    if not pool.attention:
        if not pool.counting:
            return mean
        # mean-count: the bag without the tile holds n - 1 instances
        return torch.cat([mean, torch.log1p(n - 1).expand(len(h), 1)], dim=-1)
    gate = torch.tanh(module.attention_v(projected)) * torch.sigmoid(module.attention_u(projected))
    s = module.attention_w(gate).double()  # [c, 1]
    g = torch.sigmoid(s)
    weighted = pool.weighted.double()
    if pool.additive:
        return weighted[:, :1] - g * module.evidence(projected).double() / SUM_SCALE
    if pool.summing:
        return (weighted - g * h) / SUM_SCALE
    e = torch.exp(s - pool.running_max.double())
    rest = pool.total.double() - e
    parts = [(weighted - e * h) / rest.clamp_min(torch.finfo(torch.float64).tiny)]
    if pool.with_mean:
        parts.append(mean)
    if pool.counting:
        parts.append(torch.log1p((pool.gated.double() - g).clamp_min(0.0)))
    return torch.cat(parts, dim=-1)
