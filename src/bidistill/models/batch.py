"""The two dataclasses every method speaks: a ``Batch`` in, an ``Output`` out.

Mask polarity is named, not implied: ``tile_valid`` and ``clinical_valid`` are True for real data.
Convert at library boundaries (PyTorch's ``key_padding_mask`` is True for *ignore*).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


@dataclass
class Batch:
    """B patients, each a bag of up to N instances (a patient's slides pooled into one bag).

    Attributes:
        bags: float [B, N, D] instance features, zero-padded to the largest bag.
        tile_valid: bool [B, N], True for a real instance, False for padding.
        clinical: float [B, C] encoded clinical values then one missing indicator per feature
            (``ClinicalEncoder`` layout: C = n_values + F).
        clinical_valid: bool [B, F], True where a feature was observed.
        clinical_present: bool [B], True where the patient has any clinical data; methods route
            on it.
        labels: long [B] (0/1), or None at prediction time.
    """

    bags: Tensor
    tile_valid: Tensor
    clinical: Tensor
    clinical_valid: Tensor
    clinical_present: Tensor
    labels: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Page-locked copies (what a ``DataLoader`` with ``pin_memory`` calls)."""
        return self._apply(torch.Tensor.pin_memory)

    def _apply(self, change) -> Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: None if v is None else change(v) for k, v in values.items()})

    def __len__(self) -> int:
        return self.bags.shape[0]


@dataclass
class Output:
    """What ``forward`` returns.

    Attributes:
        logits: float [B, 2], the method's prediction (routed where the method routes);
            P(label = 1) = softmax(logits)[:, 1].
        attention: float [B, N] instance weights of the prediction's aggregator (zeros on
            padding), or None for methods without a bag (clinical-only).
        extras: named intermediate tensors the loss needs (embeddings, branch logits).
    """

    logits: Tensor
    attention: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def probabilities(self) -> Tensor:
        """P(label = 1), float [B]."""
        return torch.softmax(self.logits, dim=-1)[:, 1]
