"""Statistics for K-class classifiers (K > 2): the macro one-vs-rest AUC with stratified
bootstrap CIs, per-class AUCs, balanced accuracy, macro F1 and the confusion matrix at the
argmax decision, and a paired bootstrap test of the macro AUC (DeLong's test is binary).

Each class's one-vs-rest AUC is the mean of a pair kernel (``metrics.pair_kernel``), class k's
patients against all others, averaged over the replicates (mask seeds, folds) as the binary
statistics are; a bootstrap resample reweights the patients (``metrics.weighted_auc``), the same
resamples for every method and rate, so that methods stay paired.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from bidistill.evaluation import metrics as M


def class_kernels(probs: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """Per class k: the pair kernel ``[..., n_k, n - n_k]`` of ``probs[..., k]`` (``probs``
    ``[..., n, K]``) over class k's patients against the rest."""
    return [M.pair_kernel(probs[..., k], labels == k) for k in range(probs.shape[-1])]


def macro_auc(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(macro AUC ``[...]``, per-class AUCs ``[..., K]``) of ``probs`` ``[..., n, K]``; a class
    without patients is NaN and left out of the macro mean."""
    per_class = np.stack(
        [
            k.mean(axis=(-2, -1)) if k.size else np.full(k.shape[:-2], np.nan)
            for k in class_kernels(probs, labels)
        ],
        axis=-1,
    )
    return np.nanmean(per_class, axis=-1), per_class


def class_weights_draws(labels: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """``[n_boot, n]`` multiplicities of stratified patient resamples: each class keeps its
    size, so that every resample has every class."""
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_boot, len(labels)))
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        weights[:, members] = rng.multinomial(
            len(members), np.full(len(members), 1 / len(members)), size=n_boot
        )
    return weights


def bootstrap_macro_auc(
    kernels: list[np.ndarray], labels: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """``[m, n_boot]`` macro AUCs of ``m`` classifiers (``kernels``: per class ``[m, n_k,
    n - n_k]``) under the resamples ``weights`` ``[n_boot, n]``."""
    per_class = [
        M.weighted_auc(kernel, weights[:, labels == k], weights[:, labels != k])
        for k, kernel in enumerate(kernels)
        if kernel.shape[1] and kernel.shape[2]
    ]
    return np.mean(per_class, axis=0)


def decision_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """At the argmax decision: accuracy, balanced accuracy (= the mean recall), macro F1, the
    mean per-class sensitivity and specificity; plus the multi-class Brier score and the
    top-label ECE."""
    n_classes = probs.shape[-1]
    matrix = confusion_matrix(labels, probs)
    tp = np.diag(matrix).astype(np.float64)
    truth, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(truth > 0, tp / truth, np.nan)
        specificity = (len(labels) - truth - predicted + tp) / (len(labels) - truth)
        f1 = np.where(truth + predicted > 0, 2 * tp / (truth + predicted), 0.0)
    onehot = np.eye(n_classes)[labels]
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    return {
        "accuracy": float(tp.sum() / len(labels)),
        "balanced_accuracy": float(np.nanmean(recall)),
        "f1": float(np.mean(f1[truth + predicted > 0])),  # the classes scikit-learn counts
        "sensitivity": float(np.nanmean(recall)),
        "specificity": float(np.nanmean(specificity)),
        "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=-1))),
        "ece": M.expected_calibration_error(correct, confidence),
    }


def confusion_matrix(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``[K, K]`` counts: row = true class, column = the argmax class."""
    n_classes = probs.shape[-1]
    predicted = probs.argmax(axis=-1)
    return np.bincount(labels * n_classes + predicted, minlength=n_classes**2).reshape(
        n_classes, n_classes
    )


def paired_bootstrap_test(
    boot_a: np.ndarray, boot_b: np.ndarray, auc_a: float, auc_b: float
) -> M.PairedTest:
    """Two-sided test of macro AUC a = b from paired resamples (the same patients drawn for
    both): z = observed difference / the resamples' standard deviation of it (as pROC's
    bootstrap test)."""
    difference = auc_a - auc_b
    spread = float(np.std(boot_a - boot_b, ddof=1))
    if not np.isfinite(spread):
        return M.PairedTest(difference, np.nan, np.nan, "bootstrap", 0.0)
    if spread <= 1e-15:
        return M.PairedTest(
            difference, 0.0, 1.0 if abs(difference) < 1e-12 else 0.0, "bootstrap", 0.0
        )
    z = difference / spread
    return M.PairedTest(difference, z, float(2 * stats.norm.sf(abs(z))), "bootstrap", 0.0)


def mean_macro_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The macro AUC of ``[R, n, K]`` scores averaged over the replicates (the rows)."""
    return float(np.mean(macro_auc(scores, labels)[0]))


def paired_macro_test(
    scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray, *, n_boot: int = 1000
) -> M.PairedTest:
    """Paired bootstrap test of the replicate-averaged macro AUCs of ``[R, n, K]`` scores."""
    kernels = [
        np.stack([ka.mean(axis=0), kb.mean(axis=0)])
        for ka, kb in zip(class_kernels(scores_a, labels), class_kernels(scores_b, labels))
    ]
    boot = bootstrap_macro_auc(kernels, labels, class_weights_draws(labels, n_boot))
    auc_a, auc_b = mean_macro_auc(scores_a, labels), mean_macro_auc(scores_b, labels)
    return paired_bootstrap_test(boot[0], boot[1], auc_a, auc_b)
