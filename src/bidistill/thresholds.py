"""The decision threshold: the rule that turns a probability into a class, shared by the
evaluation (thresholded metrics) and prediction (each new patient's decision), so that both
decide alike."""

from __future__ import annotations

import numpy as np

# When the validation patients cannot choose a threshold (one class only): the neutral one.
FALLBACK_THRESHOLD = 0.5


def youden_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity − 1 (predict positive if p ≥ t); ties
    in J go to the highest threshold (the first ROC point reaching the maximum). NaN when a
    class is empty (no sensitivity or no specificity to trade)."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    order = np.argsort(-probs, kind="mergesort")
    sorted_probs, sorted_labels = probs[order], labels[order]
    tp = np.cumsum(sorted_labels)
    fp = np.cumsum(~sorted_labels)
    # The last index of each run of equal scores: thresholds between distinct values.
    ends = np.r_[np.flatnonzero(np.diff(sorted_probs) != 0), len(probs) - 1]
    j = tp[ends] / tp[-1] - fp[ends] / fp[-1]
    return float(sorted_probs[ends[np.argmax(j)]])
