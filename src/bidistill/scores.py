"""How well predicted probabilities rank the labels: the AUC of a binary label, the macro
one-vs-rest AUC of a K-class one. Shared by training (model selection on validation) and the
evaluation, so that both score alike."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auc_or_nan(labels: np.ndarray, scores: np.ndarray) -> float:
    """The AUC of ``scores`` [n] (P(label = 1)) or the macro one-vs-rest AUC of ``scores``
    [n, K] (each class's probability) against ``labels`` [n]; NaN when it is undefined."""
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if scores.ndim == 1:
        return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else np.nan
    return float(np.nanmean(per_class_auc(labels, scores)))


def per_class_auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """[K]: class k's one-vs-rest AUC, P(class k) ranking its patients against the rest; NaN
    for a class with no patients (or no others). Their mean is scikit-learn's macro OvR AUC
    when every class is present."""
    labels = np.asarray(labels)
    aucs = np.full(scores.shape[1], np.nan)
    for k in range(scores.shape[1]):
        is_k = labels == k
        if is_k.any() and not is_k.all():
            aucs[k] = roc_auc_score(is_k, scores[:, k])
    return aucs


def probability_columns(pass_: str, n_classes: int) -> list[str]:
    """The predictions file's columns of one pass (``present`` or ``absent``): ``prob_present``
    (P(label = 1)) for a binary label, ``prob_present_0`` … ``prob_present_<K-1>`` else."""
    if n_classes == 2:
        return [f"prob_{pass_}"]
    return [f"prob_{pass_}_{k}" for k in range(n_classes)]
