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

from bidistill.models.aggregators import Aggregate, GatedAttentionMIL, MeanPoolMIL


def streams(module: nn.Module) -> bool:
    """Whether ``PoolStream`` can run ``module`` (others need the whole bag at once)."""
    return type(module) in (GatedAttentionMIL, MeanPoolMIL)


class PoolStream:
    """Feed ``update(chunk, valid)`` with [B, c, D] instances and their [B, c] validity, then
    ``result()`` gives the module's ``Aggregate`` for the whole bags. It serves prediction: eval
    mode is assumed (the projection's dropout would otherwise differ from a one-pass forward),
    and it runs without gradients (the buffers are updated in place). The layers are applied
    by their weights (``addmm`` into the buffers), so forward hooks on them do not fire.

    Nothing of size c or n is allocated per chunk: what is kept per instance (the attention
    scores, the validity) goes into buffers of the whole bag's length, ``n_instances``,
    allocated once, the layers write their activations into buffers that every chunk reuses, and
    the running sums are updated in place. Tensors allocated per chunk, the kept ones among the
    freed ones, fragment the heap: the process grew with the number of chunks (256 MiB for a bag
    of 1M tiles at a 64 MiB budget) instead of staying near one chunk's worth.
    """

    def __init__(self, module: nn.Module, n_instances: int):
        if not streams(module):
            raise TypeError(f"{type(module).__name__} cannot pool in chunks")
        self.module = module
        self.n_instances = n_instances
        self.attention = isinstance(module, GatedAttentionMIL)
        self.with_mean = not self.attention or module.with_mean
        self.seen = 0  # instances fed so far
        self.scores: Tensor | None = None  # attention: [B, n], -inf on padding
        self.valid: Tensor | None = None  # [B, n]
        self.running_max: Tensor | None = None  # [B, 1]
        self.total: Tensor | None = None  # Σ exp(s - max), [B, 1]
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
        self.total, self.count = zeros(batch, 1), zeros(batch, 1)
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
            return Aggregate(mean, self.valid.to(mean.dtype) / self.count.clamp_min(1.0))
        tiny = torch.finfo(self.total.dtype).tiny
        pooled = self.weighted / self.total.clamp_min(tiny)
        embedding = torch.cat([pooled, mean], dim=-1) if self.with_mean else pooled
        # softmax = exp(s - max) / Σ exp(s - max), from the running max and sum: padding and
        # empty bags (max -inf) give exp(-inf) = 0, as masked_softmax does.
        shift = torch.where(torch.isfinite(self.running_max), self.running_max, 0.0)
        weights = self.scores.sub_(shift).exp_().div_(self.total.clamp_min(tiny))
        return Aggregate(embedding, weights)
