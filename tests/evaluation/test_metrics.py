"""The statistics against independent computations: scikit-learn and slow O(n²) references."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from bidistill.evaluation import metrics as M


def _scores(rng: np.random.Generator, n: int, shift: float, *, ties: bool = False):
    labels = (rng.random(n) < 0.4).astype(int)
    labels[:2] = [0, 1]
    scores = rng.normal(size=n) + shift * labels
    if ties:
        scores = np.round(scores, 1)  # many tied scores
    return labels, scores


def _slow_delong(scores: np.ndarray, labels: np.ndarray):
    """DeLong et al. (1988) straight from the definition, with explicit pair loops."""
    pos_idx, neg_idx = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    m = len(scores)

    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    v10 = np.zeros((m, len(pos_idx)))
    v01 = np.zeros((m, len(neg_idx)))
    for k in range(m):
        for a, i in enumerate(pos_idx):
            for b, j in enumerate(neg_idx):
                value = psi(scores[k, i], scores[k, j])
                v10[k, a] += value / len(neg_idx)
                v01[k, b] += value / len(pos_idx)
    aucs = v10.mean(axis=1)
    s10 = np.zeros((m, m))
    s01 = np.zeros((m, m))
    for r in range(m):
        for s in range(m):
            s10[r, s] = np.sum((v10[r] - aucs[r]) * (v10[s] - aucs[s])) / (len(pos_idx) - 1)
            s01[r, s] = np.sum((v01[r] - aucs[r]) * (v01[s] - aucs[s])) / (len(neg_idx) - 1)
    return aucs, s10 / len(pos_idx) + s01 / len(neg_idx)


@pytest.mark.parametrize("ties", [False, True])
def test_delong_matches_slow_reference_and_sklearn(ties: bool) -> None:
    rng = np.random.default_rng(3)
    labels, base = _scores(rng, 83, 1.0, ties=ties)
    scores = np.stack([base, base + rng.normal(scale=0.8, size=83), rng.normal(size=83)])
    if ties:
        scores = np.round(scores, 1)
    comp = M.delong_components(scores, labels)
    aucs, cov = _slow_delong(scores, labels)
    np.testing.assert_allclose(comp.aucs, aucs, atol=1e-12)
    np.testing.assert_allclose(comp.covariance(), cov, atol=1e-12)
    for k in range(3):
        assert comp.aucs[k] == pytest.approx(roc_auc_score(labels, scores[k]), abs=1e-12)
    diff, z, p = M.delong_test(comp, 0, 2)
    expected_z = (aucs[0] - aucs[2]) / np.sqrt(cov[0, 0] + cov[2, 2] - 2 * cov[0, 2])
    assert z == pytest.approx(expected_z, rel=1e-10)
    assert 0 <= p < 0.05  # a strong classifier against noise on 83 patients


def test_delong_identical_scores_give_p_one() -> None:
    labels, scores = _scores(np.random.default_rng(0), 50, 1.0)
    comp = M.delong_components(np.stack([scores, scores]), labels)
    assert M.delong_test(comp, 0, 1) == (0.0, 0.0, 1.0)


def test_averaged_components_are_those_of_the_averaged_kernel() -> None:
    rng = np.random.default_rng(1)
    labels, _ = _scores(rng, 40, 0.0)
    seeds = rng.normal(size=(5, 40)) + labels  # five mask seeds of one method
    comps = [M.delong_components(s[None], labels) for s in seeds]
    v10 = np.mean([c.v10 for c in comps], axis=0)
    kernel = M.pair_kernel(seeds, labels).mean(axis=0)  # [n_pos, n_neg]
    np.testing.assert_allclose(v10[0], kernel.mean(axis=1), atol=1e-12)


def test_pair_kernel_auc_equals_sklearn_with_ties() -> None:
    labels, scores = _scores(np.random.default_rng(2), 120, 0.7, ties=True)
    assert M.pair_kernel(scores, labels).mean() == pytest.approx(roc_auc_score(labels, scores))


def test_bootstrap_matches_explicit_resampling() -> None:
    rng = np.random.default_rng(4)
    labels, scores = _scores(rng, 60, 1.0)
    kernel = M.pair_kernel(scores, labels)[None]
    fast = M.bootstrap_auc(kernel, n_boot=50, seed=7)[0]
    # Rebuild the same resamples from the multiplicities and score them with scikit-learn.
    gen = np.random.default_rng(7)
    pos, neg = scores[labels == 1], scores[labels == 0]
    w_pos = gen.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=50)
    w_neg = gen.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=50)
    for b in range(50):
        s = np.r_[np.repeat(pos, w_pos[b]), np.repeat(neg, w_neg[b])]
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        assert fast[b] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_bootstrap_ci_covers_the_true_auc_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(5)
    widths = []
    for n in (100, 1600):
        labels, scores = _scores(rng, n, 1.0)  # true AUC = Φ(1/√2) ≈ 0.760
        samples = M.bootstrap_auc(M.pair_kernel(scores, labels)[None], n_boot=1000, seed=0)
        low, high = M.percentile_ci(samples, 0.95)
        assert low[0] < 0.760 < high[0]
        widths.append(high[0] - low[0])
    assert widths[1] < widths[0] / 2.5  # width shrinks like 1/√n


def test_holm_against_hand_computation() -> None:
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.5])
    # sorted: .01*4=.04, .03*3=.09, .04*2=.08 -> running max .09, .5*1=.5
    np.testing.assert_allclose(M.holm(p), [0.04, 0.09, 0.09, np.nan, 0.5])


def test_youden_threshold_matches_sklearn_roc() -> None:
    for seed in range(5):
        labels, scores = _scores(np.random.default_rng(seed), 70, 0.8, ties=seed % 2 == 1)
        probs = 1 / (1 + np.exp(-scores))
        fpr, tpr, thr = roc_curve(labels, probs, drop_intermediate=False)
        best = 1 + np.argmax((tpr - fpr)[1:])
        assert M.youden_threshold(labels, probs) == pytest.approx(thr[best])


def test_threshold_metrics_match_sklearn() -> None:
    labels, scores = _scores(np.random.default_rng(8), 90, 1.0)
    probs = 1 / (1 + np.exp(-scores))
    got = M.threshold_metrics(labels, probs, 0.55)
    pred = (probs >= 0.55).astype(int)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    assert got["f1"] == pytest.approx(f1_score(labels, pred))
    assert got["sensitivity"] == pytest.approx(recall_score(labels, pred))
    assert got["specificity"] == pytest.approx(recall_score(1 - labels, 1 - pred))
    assert M.brier_score(labels, probs) == pytest.approx(brier_score_loss(labels, probs))


def test_expected_calibration_error() -> None:
    rng = np.random.default_rng(9)
    probs = rng.random(200_000)
    calibrated = (rng.random(probs.size) < probs).astype(int)
    assert M.expected_calibration_error(calibrated, probs) < 0.01
    # Always saying 0.9 for a 50% event is off by 0.4.
    half = (np.arange(1000) % 2).astype(int)
    assert M.expected_calibration_error(half, np.full(1000, 0.9)) == pytest.approx(0.4)
