"""Statistics for binary classifiers: AUC with bootstrap CIs, DeLong's test, thresholded metrics.

Small test sets. DeLong's test and the percentile bootstrap rest on large-sample approximations:
with a handful of patients DeLong's variance can be nearly 0 (p = 1e-10 on 7 patients) and the
bootstrap interval of an AUC of 1 is [1, 1]. Below ``LARGE_SAMPLE_PER_CLASS`` patients in either
class the paired test is therefore an exact permutation test (``permutation_test``) and the CI
Newcombe's score interval (``newcombe_ci``), both valid at any size.

Everything works on numpy arrays and is vectorised so that a full missing-modality sweep (10
methods x 6 rates x 10 mask seeds, 1000 bootstrap resamples) takes seconds.

The AUC is a mean over (positive, negative) pairs of the kernel ψ(x, y) = 1[x > y] + ½·1[x = y].
Averaging predictions over mask seeds (and folds) averages that kernel, so the seed-averaged AUC
is again a pairwise mean. Both the bootstrap and DeLong's test work on such averaged kernels,
which makes them test the seed-averaged AUC that ``metrics.csv`` reports: patients are resampled
(bootstrap) or treated as the random unit (DeLong), and the randomness of the masks is averaged
out by the seeds.
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


# --- AUC kernels --------------------------------------------------------------------------------


def pair_kernel(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ψ over all (positive, negative) pairs.

    Args:
        scores: ``[..., n]`` scores; leading axes are e.g. methods or mask seeds.
        labels: ``[n]`` 0/1.

    Returns:
        ``[..., n_pos, n_neg]`` float64: 1 where the positive scores higher, ½ on ties, else 0.
    """
    labels = np.asarray(labels).astype(bool)
    pos = scores[..., labels][..., :, None]
    neg = scores[..., ~labels][..., None, :]
    return (pos > neg) + 0.5 * (pos == neg)


def bootstrap_auc(
    kernels: np.ndarray, *, n_boot: int = 1000, seed: int = 0, chunk: int = 200
) -> np.ndarray:
    """AUCs of stratified patient-level bootstrap resamples.

    Each resample draws ``n_pos`` positives and ``n_neg`` negatives with replacement (so both
    classes keep their size); its AUC is ``w_pos @ K @ w_neg / (n_pos * n_neg)`` with the
    multiplicities ``w`` of each patient. The same resamples are used for every kernel, so the
    resampled AUCs of different methods and rates are paired.

    Args:
        kernels: ``[m, n_pos, n_neg]`` pair kernels (from ``pair_kernel``, optionally averaged
            over mask seeds).
        n_boot: number of resamples.
        seed: seed of the resampling.
        chunk: resamples computed at once (bounds memory to ``chunk * n_neg`` per kernel).

    Returns:
        ``[m, n_boot]`` resampled AUCs; NaN when a class is empty (no AUC to resample).
    """
    m, n_pos, n_neg = kernels.shape
    if not n_pos or not n_neg:
        return np.full((m, n_boot), np.nan)
    rng = np.random.default_rng(seed)
    w_pos = rng.multinomial(n_pos, np.full(n_pos, 1 / n_pos), size=n_boot).astype(np.float64)
    w_neg = rng.multinomial(n_neg, np.full(n_neg, 1 / n_neg), size=n_boot).astype(np.float64)
    out = np.empty((m, n_boot))
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        # [m, b, n_neg] = w_pos[b, n_pos] @ K[m, n_pos, n_neg], then weighted by w_neg.
        weighted = np.einsum("bi,mij->mbj", w_pos[start:stop], kernels, optimize=True)
        out[:, start:stop] = np.einsum("mbj,bj->mb", weighted, w_neg[start:stop])
    return out / (n_pos * n_neg)


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval along the last axis: ``(low [...], high [...])``."""
    alpha = (1 - level) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha], axis=-1)
    return low, high


# --- DeLong -------------------------------------------------------------------------------------


@dataclass
class DelongComponents:
    """DeLong's structural components of ``m`` correlated AUCs on the same patients.

    ``v10[k, i]``: share of negatives that positive ``i`` outranks under score ``k`` (ties ½);
    ``v01[k, j]``: share of positives that outrank negative ``j``. Their means are the AUCs.
    Components of several mask seeds may be averaged: they stay those of the averaged kernel.
    """

    v10: np.ndarray  # [m, n_pos]
    v01: np.ndarray  # [m, n_neg]

    @property
    def aucs(self) -> np.ndarray:
        return self.v10.mean(axis=1)

    def covariance(self) -> np.ndarray:
        """``[m, m]`` DeLong covariance of the AUCs; NaN when a class has fewer than 2 patients
        (a variance needs two)."""
        n_pos, n_neg = self.v10.shape[1], self.v01.shape[1]
        if min(n_pos, n_neg) < 2:
            return np.full((len(self.v10), len(self.v10)), np.nan)
        s10 = np.atleast_2d(np.cov(self.v10))
        s01 = np.atleast_2d(np.cov(self.v01))
        return s10 / n_pos + s01 / n_neg


def delong_components(scores: np.ndarray, labels: np.ndarray) -> DelongComponents:
    """Structural components by the midrank algorithm of Sun & Xu (2014), O(m·n log n).

    Args:
        scores: ``[m, n]`` scores of ``m`` classifiers on the same ``n`` patients.
        labels: ``[n]`` 0/1, both classes present.
    """
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
    """Paired two-sided DeLong test of AUC[a] = AUC[b].

    Returns:
        ``(auc_a - auc_b, z, p)``; identical scores give z = 0 and p = 1; z and p are NaN when
        a class has fewer than 2 patients (no variance estimate).
    """
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


# --- paired test of two AUCs at any sample size -------------------------------------------------


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
    """DeLong's test when both classes are large (``large_sample``), else the permutation test.

    Args:
        scores_a, scores_b: ``[R, n]`` scores of the two methods on the same ``n`` patients, one
            row per replicate (fold, mask seed); the test is of the replicate-averaged AUCs.
        labels: ``[n]`` 0/1.
        seed: seed of the permutation draws (used only above ``EXACT_MAX_PATIENTS``).
    """
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
    """Each patient's share ``w`` of the AUC difference under swaps of the two methods' ranks.

    The permutation test of Bandos, Rockette & Gur (2005) swaps, per patient, the ranks the two
    methods give it (ranks, so that methods with other score scales can be exchanged). Write
    ``u_i = -1`` where patient ``i`` is swapped and ``+1`` elsewhere: the AUC difference after the
    swaps is ``u @ w``, linear in ``u`` (each pair kernel is bilinear in the two patients'
    choices), and ``sum(w)`` is the observed difference. Averaging over replicates keeps that.

    Args:
        scores_a, scores_b: ``[R, n]``.
        labels: ``[n]`` 0/1.

    Returns:
        ``[n]`` weights in the patients' order.
    """
    labels = np.asarray(labels).astype(bool)
    rank_a = stats.rankdata(scores_a, axis=-1)
    rank_b = stats.rankdata(scores_b, axis=-1)

    def kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:  # ψ(x of positive, y of negative)
        pos, neg = x[:, labels][:, :, None], y[:, ~labels][:, None, :]
        return (pos > neg) + 0.5 * (pos == neg)

    same = kernel(rank_a, rank_a) - kernel(rank_b, rank_b)  # [R, n_pos, n_neg]
    cross = kernel(rank_a, rank_b) - kernel(rank_b, rank_a)
    scale = 2 * labels.sum() * (~labels).sum()
    weights = np.empty(len(labels))
    weights[labels] = (same + cross).sum(axis=2).mean(axis=0) / scale
    weights[~labels] = (same - cross).sum(axis=1).mean(axis=0) / scale
    return weights


def permutation_test(
    scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray, *, seed: int = 0
) -> PairedTest:
    """Paired permutation test of the AUC difference, valid at any sample size.

    Up to ``EXACT_MAX_PATIENTS`` patients every one of the ``2^n`` swap patterns is enumerated
    (exact p); above, ``PERMUTATIONS`` random patterns with a fixed seed give the Monte Carlo
    p-value ``(k + 1) / (B + 1)``. ``p_floor`` is the smallest p-value possible on these patients:
    the share of patterns reaching the largest possible difference (at least 2 / 2^n, since
    swapping every patient mirrors the difference), or ``1 / (B + 1)`` for the drawn patterns.
    With a class empty there is no AUC: difference and p are NaN.
    """
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


# --- confidence interval of one AUC at any sample size ------------------------------------------


def newcombe_ci(auc: float, n_pos: int, n_neg: int, level: float = 0.95) -> tuple[float, float]:
    """Newcombe's score interval for an AUC (Newcombe 2006, Statistics in Medicine 25, "Confidence
    intervals for an effect size measure based on the Mann-Whitney statistic", part 2, method 5).

    The AUCs θ not rejected by the Wald test with the Hanley–McNeil variance evaluated at θ
    (not at the estimate), with both class sizes replaced by N* = (n_pos + n_neg) / 2 − 1:
    (AUC − θ)² ≤ z² V(θ). Like Wilson's interval for a proportion it stays inside [0, 1] and is
    not degenerate at an AUC of 0 or 1, where the bootstrap and Wald intervals collapse.
    NaN when a class is empty (no AUC).
    """
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


# --- threshold and thresholded metrics ----------------------------------------------------------


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
