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
    """B patients, each a bag of up to N instances (a patient's slides pooled into one bag)."""

    bags: Tensor  # float [B, N, D], zero-padded to the largest bag (end-to-end: uint8 tiles)
    tile_valid: Tensor  # bool [B, N], True for a real instance
    clinical: Tensor  # float [B, C]: ClinicalEncoder's values, then one indicator per feature
    clinical_valid: Tensor  # bool [B, F], True where a feature was observed
    clinical_present: Tensor  # bool [B], the patient has any clinical data: methods route on it
    labels: Tensor | None = None  # long [B] (0/1), None at prediction time

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
    """What ``forward`` returns."""

    logits: Tensor  # float [B, K] (K = 2: a binary label), routed where the method routes
    # The prediction's aggregator's instance weights [B, N] (zeros on padding); None: no bag.
    attention: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)  # what the loss needs

    @property
    def probabilities(self) -> Tensor:
        """What a prediction records: P(label = 1) [B] for a binary label, each class's
        probability [B, K] for K > 2 classes."""
        probabilities = torch.softmax(self.logits, dim=-1)
        return probabilities[:, 1] if probabilities.shape[-1] == 2 else probabilities
