"""Prediction for new patients from their bags and clinical data, with attention per instance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from bidistill.cohort import EncodedClinical
from bidistill.models import Method
from bidistill.models.streaming import DEFAULT_MEMORY_BUDGET, ArrayBag, ChunkedBag, predict_bag


@dataclass
class BagPredictions:
    """Predictions for n bags."""

    probabilities: np.ndarray  # float [n], P(label = 1)
    attention: list[np.ndarray] | None  # the routed aggregator's weights (None: no bag)
    branches: list[dict[str, np.ndarray]] = field(default_factory=list)  # every aggregator's
    routed: list[str | None] = field(default_factory=list)  # the branch each prediction used


def predict_bags(
    method: Method,
    bags: Sequence[np.ndarray | ChunkedBag],
    clinical: EncodedClinical,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> BagPredictions:
    """Predict new patients from their whole bags (arrays [n_i, D] or ``ChunkedBag``s such as
    ``FileBag``) and encoded clinical data (``encoder.missing_row(n)``: without it), one bag at
    a time through ``predict_bag`` in bounded memory: the numbers of the run's predictions."""
    if len(bags) != len(clinical.values):
        raise ValueError(f"{len(bags)} bags but {len(clinical.values)} clinical rows")
    values = torch.as_tensor(np.asarray(clinical.values, dtype=np.float32))
    valid = torch.as_tensor(np.asarray(clinical.valid, dtype=bool))
    indices = range(len(bags))
    if progress:
        from bidistill._progress import transient_track

        indices = transient_track(indices, "predicting")
    outputs = [
        predict_bag(
            method,
            bags[i] if hasattr(bags[i], "chunks") else ArrayBag(bags[i]),
            values[i],
            valid[i],
            bool(clinical.present[i]),
            memory_budget=memory_budget,
            device=device,
        )
        for i in indices
    ]
    probabilities = np.array([o.probability for o in outputs], dtype=np.float32)
    routed = [o.routed for o in outputs]
    attention = [o.attention[r] for o, r in zip(outputs, routed) if r is not None]
    return BagPredictions(
        probabilities,
        attention if len(attention) == len(outputs) and outputs else None,
        branches=[o.attention for o in outputs],
        routed=routed,
    )
