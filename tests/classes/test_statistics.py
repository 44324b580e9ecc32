"""K-class statistics against scikit-learn, and the paired bootstrap test's behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from bidistill.evaluation import multiclass as MC
from bidistill.scores import auc_or_nan, per_class_auc


def _draw(n=90, k=3, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k)) + signal * np.eye(k)[labels]
    logits[:5] = np.round(logits[:5])  # a few ties
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs


@pytest.mark.parametrize("seed", range(4))
def test_macro_auc_is_scikit_learns_macro_one_vs_rest_auc(seed):
    labels, probs = _draw(seed=seed, k=3 + seed % 2)
    expected = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    macro, per_class = MC.macro_auc(probs, labels)
    assert abs(float(macro) - expected) < 1e-12
    assert abs(auc_or_nan(labels, probs) - expected) < 1e-12  # what training selects on
    ovr = [skm.roc_auc_score(labels == k, probs[:, k]) for k in range(probs.shape[1])]
    np.testing.assert_allclose(per_class, ovr, atol=1e-12)
    np.testing.assert_allclose(per_class_auc(labels, probs), ovr, atol=1e-12)


def test_replicates_average_like_the_binary_statistics():
    labels, a = _draw(seed=1)
    _, b = _draw(seed=2)
    b = b[np.random.default_rng(0).permutation(len(b))]
    stacked = np.stack([a, b])  # [R, n, K]
    macro, _ = MC.macro_auc(stacked, labels)
    expected = [skm.roc_auc_score(labels, p, multi_class="ovr") for p in (a, b)]
    np.testing.assert_allclose(macro, expected, atol=1e-12)
    assert abs(MC.mean_macro_auc(stacked, labels) - np.mean(expected)) < 1e-12


def test_decision_metrics_are_scikit_learns_at_the_argmax():
    labels, probs = _draw(seed=3, signal=0.7)
    got = MC.decision_metrics(labels, probs)
    predicted = probs.argmax(axis=1)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted), abs=1e-12)
    balanced = skm.balanced_accuracy_score(labels, predicted)
    assert got["balanced_accuracy"] == pytest.approx(balanced, abs=1e-12)
    assert got["sensitivity"] == pytest.approx(balanced, abs=1e-12)
    assert got["f1"] == pytest.approx(skm.f1_score(labels, predicted, average="macro"), abs=1e-12)
    matrix = skm.confusion_matrix(labels, predicted)
    np.testing.assert_array_equal(MC.confusion_matrix(labels, probs), matrix)
    tn = [matrix.sum() - matrix[k].sum() - matrix[:, k].sum() + matrix[k, k] for k in range(3)]
    specificity = np.mean([tn[k] / (matrix.sum() - matrix[k].sum()) for k in range(3)])
    assert got["specificity"] == pytest.approx(specificity, abs=1e-12)
    onehot = np.eye(3)[labels]
    assert got["brier"] == pytest.approx(np.mean(((probs - onehot) ** 2).sum(axis=1)))


def test_stratified_resamples_keep_every_class_and_reproduce():
    labels = np.array([0] * 7 + [1] * 3 + [2] * 20)
    draws = MC.class_weights_draws(labels, 50, seed=0)
    for k in range(3):
        assert (draws[:, labels == k].sum(axis=1) == (labels == k).sum()).all()
    np.testing.assert_array_equal(draws, MC.class_weights_draws(labels, 50, seed=0))


def test_the_bootstrap_of_unit_weights_is_the_macro_auc():
    labels, probs = _draw(seed=4)
    kernels = [k[None] for k in MC.class_kernels(probs, labels)]
    ones = np.ones((2, len(labels)))
    boot = MC.bootstrap_macro_auc(kernels, labels, ones)
    np.testing.assert_allclose(boot, skm.roc_auc_score(labels, probs, multi_class="ovr"))


def test_the_paired_test_finds_a_real_difference_and_not_a_relabelling():
    labels, good = _draw(n=300, seed=5, signal=2.0)
    _, noise = _draw(n=300, seed=6, signal=0.0)
    same = MC.paired_macro_test(good[None], good[None], labels)
    assert same.difference == 0 and same.p_value == 1.0
    better = MC.paired_macro_test(good[None], noise[None], labels)
    assert better.difference > 0.2 and better.p_value < 1e-6 and better.test == "bootstrap"
    # Two equally uninformative scorers: no difference beyond chance.
    _, other_noise = _draw(n=300, seed=7, signal=0.0)
    assert MC.paired_macro_test(noise[None], other_noise[None], labels).p_value > 0.01


def test_macro_f1_counts_a_class_that_is_only_predicted_as_scikit_learn_does():
    labels = np.array([0, 0, 1, 1, 1])
    probs = np.eye(3)[[0, 2, 1, 1, 0]] * 0.8 + 0.2 / 3
    expected = skm.f1_score(labels, probs.argmax(axis=1), average="macro")
    assert MC.decision_metrics(labels, probs)["f1"] == pytest.approx(expected, abs=1e-12)
