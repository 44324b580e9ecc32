"""Prediction for new patients from their bags and clinical data, with attention per instance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bidistill.cohort import EncodedClinical
from bidistill.models import Method
from bidistill.training.bounded import prediction_loader, streaming_aggregation
from bidistill.training.data import ArrayBags, PatientBags


@dataclass
class BagPredictions:
    """Predictions for n bags.

    Attributes:
        probabilities: float [n], P(label = 1).
        attention: n arrays [n_i], the routed aggregator's instance weights (None for methods
            without a bag), in each bag's instance order.
    """

    probabilities: np.ndarray
    attention: list[np.ndarray] | None


@torch.no_grad()
def predict_bags(
    method: Method,
    bags: Sequence[np.ndarray],
    clinical: EncodedClinical,
    *,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
) -> BagPredictions:
    """Predict new patients from their bags and encoded clinical data (whole bags, eval mode).

    Args:
        method: a trained method (``load_trained``).
        bags: one array [n_i, D] per patient (its slides' features concatenated).
        clinical: the fitted encoder's ``transform`` of the patients' clinical rows (use
            ``encoder.missing_row(n)`` to predict without clinical data).
    """
    if len(bags) != len(clinical.values):
        raise ValueError(f"{len(bags)} bags but {len(clinical.values)} clinical rows")
    dataset = PatientBags(ArrayBags(bags), clinical.values, clinical.valid, clinical.present)
    dim = method.dims.in_dim
    loader = prediction_loader(dataset, batch_size, method=method, dim=dim)  # bounded memory
    method.eval()
    device = torch.device(device)
    probabilities = np.zeros(len(bags), dtype=np.float32)
    attention: list[np.ndarray | None] = [None] * len(bags)
    with streaming_aggregation(method):
        for indices, batch in zip(loader.batch_sampler, loader):
            output = method(batch.to(device))
            probabilities[indices] = output.probabilities.float().cpu().numpy()
            if output.attention is not None:
                lengths = batch.tile_valid.sum(dim=1).tolist()
                weights = output.attention.float().cpu()
                for b, (i, n) in enumerate(zip(indices, lengths)):
                    attention[i] = weights[b, :n].numpy()
    has_attention = any(a is not None for a in attention)
    return BagPredictions(probabilities, attention if has_attention else None)
