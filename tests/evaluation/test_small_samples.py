"""Statistics on a handful of test patients: the permutation test against its exact null
distribution, a CI that does not collapse at an AUC of 1, and a 7-patient run that prints no
claim its sample cannot support (ties reported as ties)."""

from __future__ import annotations

import re
from itertools import product

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from typer.testing import CliRunner

from bidistill._io import write_csv, write_text
from bidistill.cli import app
from bidistill.evaluation import metrics as M
from bidistill.evaluation.headline import build_headline


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC from its definition, pair by pair (ties count ½)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg]))


def _exact_null(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Observed difference and every value of the null distribution, by swapping the two
    methods' ranks of each subset of patients in turn (2^n subsets, each AUC from its pairs)."""
    rank_a, rank_b = stats.rankdata(a, axis=1), stats.rankdata(b, axis=1)

    def difference(swap: np.ndarray) -> float:
        x, y = np.where(swap, rank_b, rank_a), np.where(swap, rank_a, rank_b)
        return np.mean([_auc(xr, labels) - _auc(yr, labels) for xr, yr in zip(x, y)])

    n = len(labels)
    null = np.array([difference(np.array(s, bool)) for s in product((0, 1), repeat=n)])
    return difference(np.zeros(n, bool)), null


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_p_and_its_floor_match_the_enumerated_null_distribution(seed):
    rng = np.random.default_rng(seed)
    labels = np.array([1, 0, 1, 0, 0, 1, 0])  # 3 positive, 4 negative
    # Three replicates (mask seeds), scores rounded so that there are ties.
    a = np.round(rng.random((3, 7)) + 0.4 * labels, 1)
    b = np.round(rng.random((3, 7)), 1)
    observed, null = _exact_null(a, b, labels)
    result = M.permutation_test(a, b, labels)
    assert result.test == "exact permutation"
    assert result.difference == pytest.approx(observed)
    assert result.difference == pytest.approx(
        np.mean([_auc(x, labels) for x in a]) - np.mean([_auc(y, labels) for y in b])
    )
    tol = 1e-9
    assert result.p_value == pytest.approx(np.mean(np.abs(null) >= abs(observed) - tol))
    # The floor: the smallest p any outcome could get, that of the largest possible difference.
    floor = min(np.mean(np.abs(null) >= abs(d) - tol) for d in null)
    assert result.p_floor == pytest.approx(floor)
    assert result.p_floor >= 2 / 2**7  # swapping every patient mirrors any difference
    assert result.p_value >= result.p_floor


def test_a_perfect_against_a_reversed_ranking_gets_the_floor_not_a_tiny_p():
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    perfect = np.array([[0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.4]])
    reversed_ = 1 - perfect
    _, null = _exact_null(perfect, reversed_, labels)
    result = M.paired_auc_test(perfect, reversed_, labels)  # 7 patients: never DeLong
    assert result.test == "exact permutation" and result.difference == 1.0
    assert result.p_value == result.p_floor == pytest.approx(np.mean(np.abs(null) >= 1 - 1e-9))
    assert result.p_value > 0.01
    # DeLong's normal approximation would call this p ≈ 0.
    components = M.delong_components(np.vstack([perfect, reversed_]), labels)
    assert M.delong_test(components, 0, 1)[2] < 1e-6


def test_the_exact_test_keeps_its_level_on_eight_patients():
    """Two methods that are the same noisy predictor (exchangeable scores) on 4 + 4 patients:
    the exact test rejects at most 5% of the time (up to sampling noise of 300 trials)."""
    rng = np.random.default_rng(3)
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    rejected = []
    for _ in range(300):
        signal = 1.5 * labels + rng.normal(size=8)
        a, b = signal + rng.normal(size=(2, 8))
        rejected.append(M.permutation_test(a[None], b[None], labels).p_value <= 0.05)
    assert np.mean(rejected) <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 300)


def test_the_rule_delong_only_with_30_patients_in_each_class():
    rng = np.random.default_rng(0)
    for n_pos, expected in ((29, "permutation"), (30, "DeLong")):
        labels = np.r_[np.ones(n_pos), np.zeros(40)].astype(int)
        a, b = rng.random((2, 1, len(labels)))
        assert M.paired_auc_test(a + labels, b, labels).test == expected
    # Above 16 patients the permutation test draws 9999 swap patterns with a fixed seed.
    labels = np.r_[np.ones(10), np.zeros(10)].astype(int)
    a, b = rng.random((2, 2, 20))
    first, again = (M.permutation_test(a + labels, b, labels) for _ in range(2))
    assert (first.p_value, first.difference) == (again.p_value, again.difference)
    assert first.p_floor == pytest.approx(1 / 10000)
    assert first.p_value == pytest.approx(round(first.p_value * 10000) / 10000)


def test_newcombe_interval_is_not_degenerate_at_an_auc_of_one():
    low, high = M.newcombe_ci(1.0, 3, 4)
    assert 0.3 < low < 0.9 and high == 1.0
    # Symmetric in the AUC (relabelling the classes), inside [0, 1], around the estimate.
    low_0, high_0 = M.newcombe_ci(0.0, 3, 4)
    assert (low_0, high_0) == pytest.approx((1 - high, 1 - low))
    for auc in (0.2, 0.5, 0.83):
        a, b = M.newcombe_ci(auc, 12, 20)
        assert 0 <= a < auc < b <= 1
    # Narrower with more patients.
    assert np.diff(M.newcombe_ci(0.8, 300, 300)) < np.diff(M.newcombe_ci(0.8, 30, 30))


# --- a run with 7 test patients -----------------------------------------------------------------

CONFIG = """name: tiny
cohort:
  table: cohort.csv
  patient_column: id
  label: {column: y, positive: ['1']}
methods: [bd, fusion-mean, wsi-only]
evaluation: {mask_seeds: 3, bootstrap: 200}
"""
TEST_LABELS = [1, 1, 1, 0, 0, 0, 0]


# Test-set scores: bd ranks every patient right with or without clinical data, fusion-mean only
# with it (AUC 10/12 without), wsi-only is poor (8/12).
TEST_SCORES = {
    "bd": ([0.9, 0.8, 0.7, 0.2, 0.3, 0.1, 0.4],) * 2,
    "fusion-mean": ([0.85, 0.75, 0.95, 0.1, 0.3, 0.2, 0.35], [0.6, 0.3, 0.7, 0.5, 0.2, 0.4, 0.1]),
    "wsi-only": ([0.5, 0.3, 0.6, 0.4, 0.7, 0.2, 0.1],) * 2,
}


def _predictions(method: str) -> pd.DataFrame:
    """7 test patients (3 positive), 8 validation, 10 training."""
    rng = np.random.default_rng(sum(map(ord, method)))
    labels = np.array(TEST_LABELS + [1, 1, 1, 1, 0, 0, 0, 0] + [1, 0] * 5)
    split = ["test"] * 7 + ["val"] * 8 + ["train"] * 10
    present, absent = (
        np.r_[scores, 0.3 * labels[7:] + 0.7 * rng.random(18)] for scores in TEST_SCORES[method]
    )
    return pd.DataFrame(
        {
            "patient_id": [f"P{i:02d}" for i in range(len(labels))],
            "split": split,
            "fold": 0,
            "label": labels,
            "clinical_available": True,
            "prob_present": present,
            "prob_absent": absent,
        }
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny") / "run"
    for method in ("bd", "fusion-mean", "wsi-only"):
        write_csv(run / method / "predictions.csv", _predictions(method))
    write_text(run / "config.yaml", CONFIG)
    result = CliRunner().invoke(app, ["evaluate", str(run)], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    return run, result.stdout


def test_seven_patients_get_the_exact_test_and_no_p_below_its_floor(tiny_run):
    run, stdout = tiny_run
    delong = pd.read_csv(run / "delong.csv")
    assert set(delong["test"]) == {"exact permutation"}
    assert (delong["p_value"] >= delong["p_floor"] - 1e-12).all()
    assert (delong["p_floor"] >= 2 / 2**7).all()
    flat = " ".join(stdout.split())
    assert "p < 0.001" not in flat and "DeLong" not in flat
    assert "exact permutation test, Holm-corrected" in flat
    headline = build_headline(pd.read_csv(run / "metrics.csv"), delong, "bd")
    floor = min(r.p_floor for r in headline.rates if r.versus)
    assert floor >= 2 / 2**7
    assert f"With 7 test patients no p-value can fall below {floor:.2g}" in flat
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "p < 0.001" not in report
    assert "exact paired permutation test" in report and "Newcombe's score interval" in report
    # Every p-value shown in the report is one of delong.csv's (Holm-corrected) values.
    shown = {float(p) for p in re.findall(r"p = (\d\.\d+)", report)}
    assert shown <= {float(f"{p:.3f}") for p in delong["p_holm"]} | {
        float(f"{p:.2f}") for p in delong["p_holm"]
    }


def test_seven_patients_get_a_ci_that_does_not_collapse_at_an_auc_of_one(tiny_run):
    run, stdout = tiny_run
    metrics = pd.read_csv(run / "metrics.csv")
    bd = metrics[metrics["method"] == "bd"]
    assert (bd["auc"] == 1.0).all()
    assert set(metrics["auc_ci_method"]) == {"newcombe"}
    assert (bd["auc_ci_low"] < 0.9).all() and (bd["auc_ci_high"] == 1.0).all()
    assert (metrics["auc_ci_low"] < metrics["auc_ci_high"]).all()
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "1.000 [1.000, 1.000]" not in report and "1.00–1.00" not in stdout


def test_ties_are_reported_as_ties_naming_every_tied_method(tiny_run):
    run, stdout = tiny_run
    metrics = pd.read_csv(run / "metrics.csv")
    fusion = metrics[metrics["method"] == "fusion-mean"].set_index("missing_rate")["auc"]
    assert fusion[0.0] == 1.0 and fusion[1.0] < 1.0  # tie at r = 0 only
    headline = build_headline(metrics, pd.read_csv(run / "delong.csv"), "bd")
    assert headline.rates[0].tied == ["bd", "fusion-mean"] and headline.rates[0].versus is None
    assert headline.rates[-1].tied == [] and headline.rates[-1].versus == "fusion-mean"
    flat = " ".join(stdout.split())
    assert "has the highest AUC at every rate" not in flat
    assert "bd and fusion-mean (tie) at r = 0 (1.000)" in flat
    assert re.search(r"Tied at r = 0(, r = [\d.]+)*: no lead to test\.", flat)
    assert "(1.000 to 1.000)" not in flat
    assert "-0.000" not in flat
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "| 0 | bd and fusion-mean | 1.000 [" in report and "| – (tie) |" in report
    # Both tied AUCs are bold in the report's AUC table (its first column is r = 0).
    section = report.split("## AUC by missing rate")[1].split("\n## ")[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in section.splitlines()[4:]}
    assert rows["bd"].startswith(" **1.000**") and rows["fusion-mean"].startswith(" **1.000**")


def test_the_headline_sentence_says_what_it_tests_beside_the_stars():
    metrics = pd.DataFrame(
        [
            {"method": m, "missing_rate": 0.0, "auc": a, "auc_ci_low": a - 0.1}
            | {"auc_ci_high": a + 0.1, "n_patients": 200, "n_positive": 80}
            for m, a in (("bd", 0.80), ("x", 0.79), ("y", 0.60))
        ]
    )
    delong = pd.DataFrame(
        {"method": ["x", "y"], "missing_rate": 0.0, "auc_difference": [-0.01, -0.2]}
        | {"p_holm": [0.6, 0.001], "test": "DeLong", "p_floor": 0.0}
    )
    text = build_headline(metrics, delong, "bd").significance()
    # y differs from bd (a * in the table), but the sentence is about bd's lead over x.
    assert text.startswith("No lead is statistically significant (top AUC against bd, or against")
    assert "the runner-up where bd is top" in text
