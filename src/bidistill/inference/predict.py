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
    """Predictions for n bags.

    Attributes:
        probabilities: float [n], P(label = 1).
        attention: n arrays [n_i], the routed aggregator's instance weights (None for methods
            without a bag), in each bag's instance order.
        branches: n dicts, aggregator path → its instance weights [n_i] (every branch of the
            method, e.g. BD's ``aggregator_multi`` and ``aggregator_single``).
        routed: n aggregator paths (or None): the branch each prediction used.
    """

    probabilities: np.ndarray
    attention: list[np.ndarray] | None
    branches: list[dict[str, np.ndarray]] = field(default_factory=list)
    routed: list[str | None] = field(default_factory=list)


def predict_bags(
    method: Method,
    bags: Sequence[np.ndarray | ChunkedBag],
    clinical: EncodedClinical,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> BagPredictions:
    """Predict new patients from their whole bags and encoded clinical data (eval mode).

    Each bag is encoded in chunks sized to ``memory_budget`` (``models.streaming``), so a bag
    of any size predicts in bounded memory, and gives the same numbers as a padded batch.

    Args:
        method: a trained method (``load_trained``), on ``device``.
        bags: one per patient: an array [n_i, D] (its slides' features concatenated) or a
            ``ChunkedBag`` such as ``FileBag`` (read from the .h5 files a chunk at a time).
        clinical: the fitted encoder's ``transform`` of the patients' clinical rows (use
            ``encoder.missing_row(n)`` to predict without clinical data).
        memory_budget: bytes for what grows with a bag.
    """
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
