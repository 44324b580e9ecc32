"""Leakage guard: refuse a clinical feature that alone separates the training labels.

A feature with single-feature AUC >= 0.95 on the training patients is almost always the label in
disguise (a count of positive nodes, the surgery chosen with the nodal status known). The run
stops with an error that names it, unless the config lists it in ``cohort.allow_separating``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from bidistill.cohort.parsers import is_blank, normalise_text
from bidistill.config import ClinicalColumn, ClinicalKind
from bidistill.errors import CohortError

SEPARATION_AUC = 0.95
# With a handful of patients per class a weak feature separates them perfectly by chance; the
# guard judges only features observed in at least this many patients of each class.
MIN_PER_CLASS = 10


def separation_auc(cells: pd.Series, labels: pd.Series, col: ClinicalColumn) -> float | None:
    """AUC of one feature alone on its observed rows (direction-free); None below
    ``MIN_PER_CLASS`` observed patients of a class. With K > 2 classes the highest one-vs-rest
    AUC: a feature that singles out one class is as much the label in disguise."""
    classes = np.unique(labels.dropna().to_numpy())
    if len(classes) > 2:
        aucs = [_separation_auc(cells, (labels == k).astype(int), col) for k in classes]
        return max((a for a in aucs if a is not None), default=None)
    return _separation_auc(cells, labels, col)


def _separation_auc(cells: pd.Series, labels: pd.Series, col: ClinicalColumn) -> float | None:
    observed = ~cells.map(is_blank)
    x, y = cells[observed], labels[observed].to_numpy()
    if col.kind == ClinicalKind.numeric:
        score = pd.to_numeric(x, errors="coerce").to_numpy(float)
    elif col.kind == ClinicalKind.ordinal:
        order = {normalise_text(c): i for i, c in enumerate(col.categories or [])}
        score = np.array([order.get(normalise_text(v), np.nan) for v in x], dtype=float)
    else:
        # Categories have no order: score each level by its positive rate, the best any
        # single-feature rule can do.
        text = x.map(normalise_text)
        score = text.map(pd.Series(y, index=text.index).groupby(text).mean()).to_numpy(float)
    keep = ~np.isnan(score)
    if np.bincount(y[keep].astype(int), minlength=2).min() < MIN_PER_CLASS:
        return None
    auc = roc_auc_score(y[keep], score[keep])
    return float(max(auc, 1 - auc))


def check_separating_features(
    frame: pd.DataFrame,
    labels: pd.Series,
    columns: list[ClinicalColumn],
    allow: list[str] | tuple[str, ...] = (),
) -> dict[str, float]:
    """Raise ``CohortError`` for a feature of the training ``frame`` that separates ``labels``
    almost perfectly and is not in ``allow``; returns feature name → AUC, for the log."""
    aucs = {}
    for col in columns:
        auc = separation_auc(frame[col.feature_name], labels, col)
        if auc is None:
            continue
        aucs[col.feature_name] = auc
        allowed = col.feature_name in allow or col.column in allow
        if auc >= SEPARATION_AUC and not allowed:
            raise CohortError(
                f"clinical feature '{col.column}' alone separates the training labels "
                f"(AUC {auc:.3f} >= {SEPARATION_AUC}): it is probably the label in disguise. "
                f"Remove it from cohort.clinical, or list it in cohort.allow_separating if it is "
                "a legitimate predictor"
            )
    return aucs
