"""Statistics for binary classifiers: AUC with bootstrap CIs, DeLong's test, thresholded metrics.

Below ``LARGE_SAMPLE_PER_CLASS`` patients in a class, where DeLong and the bootstrap break down,
the paired test is an exact permutation test and the CI Newcombe's score interval. Vectorised
over methods, rates and seeds; the statistics (pair kernels averaged over mask seeds, the small
sample tests) are explained in docs/internal-interfaces.md, "Results, comparison".
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
from scipy import optimize, stats

# The threshold rule lives below the evaluation, so that prediction decides by it too.
from bidistill.thresholds import youden_threshold as youden_threshold

# Patients of the smaller class from which DeLong's normal approximation and the bootstrap are
# trusted (the same count below which the headline calls a ranking unreliable).
LARGE_SAMPLE_PER_CLASS = 30
# Up to this many patients the permutation test enumerates every sign flip (2^16 = 65536);
# above, it draws PERMUTATIONS of them with a fixed seed.
EXACT_MAX_PATIENTS = 16
PERMUTATIONS = 9999


def large_sample(labels: np.ndarray) -> bool:
    """Whether both classes have ``LARGE_SAMPLE_PER_CLASS`` patients or more."""
    n_pos = int(np.sum(np.asarray(labels).astype(bool)))
    return min(n_pos, len(labels) - n_pos) >= LARGE_SAMPLE_PER_CLASS


def pair_kernel(scores: np.ndarray, labels: np.ndarray, negatives: np.ndarray | None = None):
    """ψ of scores ``[..., n]`` over all (positive, negative) pairs: ``[..., n_pos, n_neg]``,
    1 where the positive scores higher, ½ on ties, else 0; the negatives' scores come from
    ``negatives`` when given (the cross terms of a paired test)."""
    labels = np.asarray(labels).astype(bool)
    pos = scores[..., labels][..., :, None]
    neg = (scores if negatives is None else negatives)[..., ~labels][..., None, :]
    return (pos > neg) + 0.5 * (pos == neg)


def bootstrap_auc(
    kernels: np.ndarray, *, n_boot: int = 1000, seed: int = 0, chunk: int = 200
) -> np.ndarray:
    """``[m, n_boot]`` AUCs of stratified patient-level bootstrap resamples of ``kernels``
    ``[m, n_pos, n_neg]``; NaN when a class is empty.

    A resample's AUC is ``w_pos @ K @ w_neg / (n_pos * n_neg)`` with each patient's multiplicity
    ``w``; every kernel uses the same resamples, so methods and rates stay paired. ``chunk``
    resamples at a time bound the memory.
    """
    m, n_pos, n_neg = kernels.shape
    if not n_pos or not n_neg:
        return np.full((m, n_boot), np.nan)
    rng = np.random.default_rng(seed)
    w_pos = rng.multinomial(n_pos, np.full(n_pos, 1 / n_pos), size=n_boot).astype(np.float64)
    w_neg = rng.multinomial(n_neg, np.full(n_neg, 1 / n_neg), size=n_boot).astype(np.float64)
    return weighted_auc(kernels, w_pos, w_neg, chunk=chunk)


def weighted_auc(
    kernels: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray, *, chunk: int = 200
) -> np.ndarray:
    """``[m, b]``: the AUC of each kernel ``[m, n_pos, n_neg]`` with the patients weighted by
    ``w_pos`` ``[b, n_pos]`` and ``w_neg`` ``[b, n_neg]`` (a resample's multiplicities)."""
    n_boot = len(w_pos)
    out = np.empty((len(kernels), n_boot))
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        # [m, b, n_neg] = w_pos[b, n_pos] @ K[m, n_pos, n_neg], then weighted by w_neg.
        weighted = np.einsum("bi,mij->mbj", w_pos[start:stop], kernels, optimize=True)
        out[:, start:stop] = np.einsum("mbj,bj->mb", weighted, w_neg[start:stop])
    return out / (w_pos.sum(axis=1) * w_neg.sum(axis=1))


def mean_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The AUC of ``[R, n]`` scores averaged over the replicates (the rows)."""
    return float(pair_kernel(scores, labels).mean())


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval along the last axis: ``(low [...], high [...])``."""
    alpha = (1 - level) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha], axis=-1)
    return low, high


@dataclass
class DelongComponents:
    """DeLong's structural components of ``m`` correlated AUCs on the same patients: the share
    of negatives each positive outranks (``v10``) and of positives that outrank each negative
    (``v01``); averaged over mask seeds they stay those of the averaged kernel."""

    v10: np.ndarray  # [m, n_pos]
    v01: np.ndarray  # [m, n_neg]

    @property
    def aucs(self) -> np.ndarray:
        return self.v10.mean(axis=1)

    def covariance(self) -> np.ndarray:
        """``[m, m]`` DeLong covariance of the AUCs; NaN with fewer than 2 patients in a class."""
        n_pos, n_neg = self.v10.shape[1], self.v01.shape[1]
        if min(n_pos, n_neg) < 2:
            return np.full((len(self.v10), len(self.v10)), np.nan)
        s10 = np.atleast_2d(np.cov(self.v10))
        s01 = np.atleast_2d(np.cov(self.v01))
        return s10 / n_pos + s01 / n_neg


def delong_components(scores: np.ndarray, labels: np.ndarray) -> DelongComponents:
    """Components of ``m`` classifiers' scores ``[m, n]`` by the midranks of Sun & Xu (2014)."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    labels = np.asarray(labels).astype(bool)
    pos, neg = scores[:, labels], scores[:, ~labels]
    n_pos, n_neg = pos.shape[1], neg.shape[1]
    rank_pos = stats.rankdata(pos, axis=1)  # midranks within the positives
    rank_neg = stats.rankdata(neg, axis=1)
    rank_all = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    # A positive's rank among all minus its rank among positives = negatives below it (ties ½).
    v10 = (rank_all[:, :n_pos] - rank_pos) / n_neg
    v01 = 1.0 - (rank_all[:, n_pos:] - rank_neg) / n_pos
    return DelongComponents(v10=v10, v01=v01)


def delong_test(components: DelongComponents, a: int, b: int) -> tuple[float, float, float]:
    """Paired two-sided DeLong test of AUC[a] = AUC[b]: ``(auc_a - auc_b, z, p)``; identical
    scores give z = 0 and p = 1; z and p are NaN with fewer than 2 patients in a class."""
    aucs = components.aucs
    cov = components.covariance()
    diff = float(aucs[a] - aucs[b])
    var = float(cov[a, a] + cov[b, b] - 2 * cov[a, b])
    if np.isnan(var):
        return diff, float("nan"), float("nan")
    if var <= 1e-15:
        return diff, 0.0, 1.0 if abs(diff) < 1e-12 else 0.0
    z = diff / np.sqrt(var)
    return diff, float(z), float(2 * stats.norm.sf(abs(z)))


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (NaNs are left out and stay NaN)."""
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="mergesort")]
    m = len(order)
    steps = (m - np.arange(m)) * p[order]
    adjusted[order] = np.minimum(np.maximum.accumulate(steps), 1.0)
    return adjusted


@dataclass
class PairedTest:
    """A paired two-sided test of AUC[a] = AUC[b] on the same patients."""

    difference: float  # AUC a minus AUC b (each averaged over the replicates)
    z: float  # DeLong's z; NaN for the permutation test
    p_value: float
    test: str  # "DeLong", "exact permutation" or "permutation"
    p_floor: float  # the smallest p-value the test can give on these patients (0: no floor)


def paired_auc_test(
    scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray, *, seed: int = 0
) -> PairedTest:
    """DeLong's test when both classes are large (``large_sample``), else the permutation test,
    of the replicate-averaged AUCs of ``[R, n]`` scores (one row per fold and mask seed)."""
    scores_a, scores_b = np.atleast_2d(scores_a), np.atleast_2d(scores_b)
    if not large_sample(labels):
        return permutation_test(scores_a, scores_b, labels, seed=seed)
    parts = [delong_components(np.stack([a, b]), labels) for a, b in zip(scores_a, scores_b)]
    components = DelongComponents(
        v10=np.mean([c.v10 for c in parts], axis=0), v01=np.mean([c.v01 for c in parts], axis=0)
    )
    diff, z, p = delong_test(components, 0, 1)
    return PairedTest(difference=diff, z=z, p_value=p, test="DeLong", p_floor=0.0)


def swap_weights(scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``[n]``: each patient's share ``w`` of the AUC difference under swaps of the two methods'
    ranks (ranks, so that other score scales can be exchanged): with ``u_i = -1`` where patient
    ``i`` is swapped, else +1, the difference is ``u @ w`` (Bandos, Rockette & Gur 2005)."""
    labels = np.asarray(labels).astype(bool)
    rank_a = stats.rankdata(scores_a, axis=-1)
    rank_b = stats.rankdata(scores_b, axis=-1)
    same = pair_kernel(rank_a, labels) - pair_kernel(rank_b, labels)  # [R, n_pos, n_neg]
    cross = pair_kernel(rank_a, labels, rank_b) - pair_kernel(rank_b, labels, rank_a)
    scale = 2 * labels.sum() * (~labels).sum()
    weights = np.empty(len(labels))
    weights[labels] = (same + cross).sum(axis=2).mean(axis=0) / scale
    weights[~labels] = (same - cross).sum(axis=1).mean(axis=0) / scale
    return weights


def permutation_test(
    scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray, *, seed: int = 0
) -> PairedTest:
    """Paired permutation test of the AUC difference, valid at any sample size: exact up to
    ``EXACT_MAX_PATIENTS`` patients, else ``PERMUTATIONS`` seeded draws. NaN with a class empty."""
    if len(np.unique(labels)) < 2:
        return PairedTest(float("nan"), float("nan"), float("nan"), "none (one class)", 0.0)
    weights = swap_weights(np.atleast_2d(scores_a), np.atleast_2d(scores_b), labels)
    observed = float(weights.sum())
    tolerance = 1e-12 * max(1.0, float(np.abs(weights).sum()))
    n = len(weights)
    if n <= EXACT_MAX_PATIENTS:
        signs = np.array(list(product((1.0, -1.0), repeat=n)))
        null = np.abs(signs @ weights)
        p = float(np.mean(null >= abs(observed) - tolerance))
        floor = float(np.mean(null >= null.max() - tolerance))
        return PairedTest(observed, float("nan"), p, "exact permutation", floor)
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, PERMUTATIONS, 1000):  # bounded memory: 1000 x n signs at a time
        signs = rng.choice((1.0, -1.0), size=(min(1000, PERMUTATIONS - start), n))
        extreme += int(np.sum(np.abs(signs @ weights) >= abs(observed) - tolerance))
    p = (extreme + 1) / (PERMUTATIONS + 1)
    return PairedTest(observed, float("nan"), p, "permutation", 1 / (PERMUTATIONS + 1))


def newcombe_ci(auc: float, n_pos: int, n_neg: int, level: float = 0.95) -> tuple[float, float]:
    """Newcombe's score interval for an AUC (Newcombe 2006, part 2, method 5): not degenerate
    at an AUC of 0 or 1, where the bootstrap and Wald intervals collapse. NaN with a class empty."""
    if not n_pos or not n_neg or np.isnan(auc):
        return float("nan"), float("nan")
    z = stats.norm.ppf(0.5 + level / 2)
    n_star = (n_pos + n_neg) / 2 - 1

    def excess(theta: float) -> float:
        spread = 1 + (n_star - 1) * ((1 - theta) / (2 - theta) + theta / (1 + theta))
        variance = theta * (1 - theta) / (n_pos * n_neg) * spread
        return (auc - theta) ** 2 - z**2 * variance

    step = 1e-9  # the estimate itself is a root when it is 0 or 1; look just beside it
    low = optimize.brentq(excess, 0.0, auc - step) if auc > step else 0.0
    high = optimize.brentq(excess, auc + step, 1.0) if auc < 1 - step else 1.0
    return float(low), float(high)


def threshold_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, balanced accuracy, F1, sensitivity, specificity at ``p >= threshold``."""
    labels = np.asarray(labels).astype(bool)
    pred = probs >= threshold
    tp = float(np.sum(pred & labels))
    tn = float(np.sum(~pred & ~labels))
    fp = float(np.sum(pred & ~labels))
    fn = float(np.sum(~pred & labels))
    sensitivity = tp / (tp + fn) if tp + fn else np.nan
    specificity = tn / (tn + fp) if tn + fp else np.nan
    return {
        "accuracy": (tp + tn) / len(labels),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "sensitivity": sensitivity,
        "specificity": specificity,
    }


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean((probs - labels) ** 2))


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, *, bins: int = 10) -> float:
    """ECE over ``bins`` equal-width probability bins, weighted by the patients in each bin."""
    which = np.clip((probs * bins).astype(int), 0, bins - 1)
    # Σ_b (n_b / n)·|mean p_b − mean y_b| = Σ_b |Σ p − Σ y| / n
    prob_sums = np.bincount(which, weights=probs, minlength=bins)
    label_sums = np.bincount(which, weights=labels.astype(np.float64), minlength=bins)
    return float(np.sum(np.abs(prob_sums - label_sums)) / len(probs))
