"""Attention and mean pooling over a bag that arrives in chunks, with bounded memory.

``PoolStream`` gives what ``GatedAttentionMIL`` (with or without its mean half) and
``MeanPoolMIL`` give on the whole bag, to float rounding, while holding only one chunk of
projected instances [B, c, H] at a time: the attention softmax is taken online with a running
maximum (each chunk rescales the running sums by exp(m_old - m_new)), and the scores of every
instance, one float each, are kept for the weights a heatmap shows. Two callers share it: the
trainer's predictions of whole bags (``training/bounded.py``) and ``bidistill predict`` reading
one slide's file chunk by chunk (``inference/chunked.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bidistill.models.aggregators import Aggregate, GatedAttentionMIL, MeanPoolMIL, masked_softmax


def streams(module: nn.Module) -> bool:
    """Whether ``PoolStream`` can run ``module`` (others need the whole bag at once)."""
    return type(module) in (GatedAttentionMIL, MeanPoolMIL)


class PoolStream:
    """Feed ``update(chunk, valid)`` with [B, c, D] instances and their [B, c] validity, then
    ``result()`` gives the module's ``Aggregate`` for the whole bags. Eval mode is assumed
    (the projection's dropout would otherwise differ from a one-pass forward)."""

    def __init__(self, module: nn.Module):
        if not streams(module):
            raise TypeError(f"{type(module).__name__} cannot pool in chunks")
        self.module = module
        self.attention = isinstance(module, GatedAttentionMIL)
        self.with_mean = not self.attention or module.with_mean
        self.scores: list[Tensor] = []  # attention: [B, c] per chunk, -inf on padding
        self.valid: list[Tensor] = []
        self.running_max: Tensor | None = None  # [B, 1]
        self.total: Tensor | None = None  # Σ exp(s - max), [B, 1]
        self.weighted: Tensor | None = None  # Σ exp(s - max) h, [B, H]
        self.summed: Tensor | None = None  # Σ h over valid instances, [B, H]
        self.count: Tensor | None = None  # valid instances, [B, 1]

    def update(self, chunk: Tensor, valid: Tensor) -> None:
        m = self.module
        h = m.project(chunk)  # [B, c, H]
        self.valid.append(valid)
        if self.running_max is None:
            batch, width = h.shape[0], h.shape[-1]
            zeros = h.new_zeros
            self.running_max = torch.full((batch, 1), float("-inf"), dtype=h.dtype, device=h.device)
            self.total, self.count = zeros(batch, 1), zeros(batch, 1)
            self.weighted, self.summed = zeros(batch, width), zeros(batch, width)
        if self.with_mean:
            mask = valid.to(h.dtype)
            self.summed = self.summed + torch.einsum("bc,bch->bh", mask, h)
            self.count = self.count + mask.sum(dim=1, keepdim=True)
        if not self.attention:
            return
        gate = torch.tanh(m.attention_v(h)) * torch.sigmoid(m.attention_u(h))
        s = m.attention_w(gate).squeeze(-1).masked_fill(~valid, float("-inf"))  # [B, c]
        self.scores.append(s)
        new_max = torch.maximum(self.running_max, s.max(dim=1, keepdim=True).values)
        shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        rescale = torch.exp(self.running_max - shift)  # exp(-inf) = 0 before the first score
        weights = torch.exp(s - shift)  # padding: exp(-inf) = 0
        self.weighted = self.weighted * rescale + torch.einsum("bc,bch->bh", weights, h)
        self.total = self.total * rescale + weights.sum(dim=1, keepdim=True)
        self.running_max = new_max

    def result(self, batch: int = 1) -> Aggregate:
        """The bags' aggregate; ``batch`` sizes the zero result of a stream that saw nothing."""
        if self.running_max is None:  # no chunk at all: as the module gives an empty bag
            return Aggregate(torch.zeros(batch, self.module.out_dim), torch.zeros(batch, 0))
        valid = torch.cat(self.valid, dim=1)
        mean = self.summed / self.count.clamp_min(1.0)  # an empty bag keeps a zero embedding
        if not self.attention:
            return Aggregate(mean, valid.to(mean.dtype) / self.count.clamp_min(1.0))
        pooled = self.weighted / self.total.clamp_min(torch.finfo(self.total.dtype).tiny)
        embedding = torch.cat([pooled, mean], dim=-1) if self.with_mean else pooled
        return Aggregate(embedding, masked_softmax(torch.cat(self.scores, dim=1), valid))
