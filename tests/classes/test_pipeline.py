"""A three-class cohort through run, evaluate, predict, heatmap and compare (real CLI, real
training), its metrics checked against scikit-learn on the predictions the run wrote."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm
from sklearn import metrics as skm
from typer.testing import CliRunner

from bidistill.cli import app
from bidistill.synthetic.classes import (
    CLASSES,
    GRADE_CUTS,
    ClassSpec,
    draw_class_cohort,
    make_class_cohort,
)

SETTINGS = """
methods:
  - name: bd
  - name: wsi-only
  - name: clinical-linear
training:
  epochs: 4
evaluation:
  missing_rates: [0.0, 0.5, 1.0]
  mask_seeds: 2
  bootstrap: 100
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("three")
    config = make_class_cohort(ClassSpec(patients=150, test_patients=90), folder)
    config.write_text(config.read_text() + SETTINGS)
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(folder / "run")])
    assert result.exit_code == 0, result.output
    return folder


def test_metrics_are_scikit_learns_on_the_written_predictions(run):
    metrics = pd.read_csv(run / "run" / "metrics.csv")
    predictions = pd.read_csv(run / "run" / "predictions.csv")
    columns = [f"probability_{k}" for k in range(3)]
    for (method, rate), rows in predictions.groupby(["method", "missing_rate"]):
        per_seed = [
            (
                skm.roc_auc_score(r["label"], r[columns], multi_class="ovr", average="macro"),
                [skm.roc_auc_score(r["label"] == k, r[c]) for k, c in enumerate(columns)],
                skm.balanced_accuracy_score(r["label"], r[columns].to_numpy().argmax(axis=1)),
            )
            for _, r in rows.groupby("mask_seed")
        ]
        row = metrics[(metrics["method"] == method) & np.isclose(metrics["missing_rate"], rate)]
        assert abs(row["auc"].iloc[0] - np.mean([s[0] for s in per_seed])) < 1e-9
        per_class = np.mean([s[1] for s in per_seed], axis=0)
        np.testing.assert_allclose(row[["auc_0", "auc_1", "auc_2"]].iloc[0], per_class, atol=1e-9)
        balanced = np.mean([s[2] for s in per_seed])
        assert abs(row["balanced_accuracy"].iloc[0] - balanced) < 1e-9
        assert row["auc_ci_low"].iloc[0] <= row["auc"].iloc[0] <= row["auc_ci_high"].iloc[0]
    tests = pd.read_csv(run / "run" / "delong.csv")
    assert set(tests["test"]) == {"bootstrap"} and tests["p_holm"].between(0, 1).all()


def test_the_report_speaks_of_the_classes(run):
    html = (run / "run" / "report.html").read_text()
    assert "N+(&gt;2)" in html and "ROC curves per class" in html
    assert "true \\ predicted" in html  # the K x K confusion matrices
    assert (run / "run" / "figures" / "roc_r0.png").stat().st_size > 10_000
    assert "classes of" in (run / "run" / "report.md").read_text()


def test_predict_gives_each_class_probability_and_the_argmax(run):
    out = run / "new.csv"
    args = ["predict", "--run", str(run / "run"), "--method", "bd"]
    args += ["--features", str(run / "features"), "--clinical", str(run / "cohort.csv")]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "class of highest probability" in result.output
    table = pd.read_csv(out)
    probs = table[[f"probability_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert (table["predicted"] == [CLASSES[k] for k in probs.argmax(axis=1)]).all()
    assert (table["decision"] == probs.argmax(axis=1)).all()
    np.testing.assert_allclose(table["probability"], probs.max(axis=1))
    # a test patient's prediction is the one the run evaluated at r = 0
    evaluated = pd.read_csv(run / "run" / "predictions.csv")
    at_zero = evaluated[(evaluated["method"] == "bd") & (evaluated["missing_rate"] == 0)]
    first = at_zero[at_zero["mask_seed"] == 0].set_index("patient")
    mine = table.set_index("patient_id").loc[first.index]
    np.testing.assert_allclose(
        mine[[f"probability_{c}" for c in CLASSES]].to_numpy(),
        first[[f"probability_{k}" for k in range(3)]].to_numpy(),
        atol=1e-5,
    )


def test_heatmap_and_compare_run_on_a_three_class_run(run):
    patient = pd.read_csv(run / "cohort.csv")["patient_id"].iloc[0]
    args = ["heatmap", "--run", str(run / "run"), "--features", str(run / "features")]
    args += ["--clinical", str(run / "cohort.csv"), "--method", "bd", "--patient", patient]
    result = CliRunner().invoke(app, [*args, "--out", str(run / "maps")])
    assert result.exit_code == 0, result.output
    assert list((run / "maps").glob("*.heatmap.png"))
    twin = run / "twin"
    shutil.copytree(run / "run", twin)
    args = ["compare", str(run / "run"), str(twin), "--out", str(run / "cmp")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    tests = pd.read_csv(run / "cmp" / "compare_delong.csv")
    assert (tests["auc_difference"] == 0).all() and (tests["p_value"] == 1).all()


def test_the_generators_posterior_is_the_exact_bayes_posterior():
    spec = ClassSpec(patients=6, test_patients=6, dim=5, instances=(3, 6))
    drawn = draw_class_cohort(spec, seed=3)
    present, absent = drawn.posteriors(list(range(12)))
    for i in range(12):
        bag, row = drawn.bags[i].astype(np.float64), drawn.table[i]
        log_bag = np.zeros(3)
        for y in range(3):
            key = multivariate_normal(drawn.key, np.eye(spec.dim)).pdf(bag)
            tissue = np.mean(
                [multivariate_normal(m, np.eye(spec.dim)).pdf(bag) for m in drawn.background],
                axis=0,
            )
            share = spec.key_share[y]
            log_bag[y] = np.sum(np.log(share * key + (1 - share) * tissue))
        log_clinical = np.zeros(3)
        for y in range(3):
            if row["size"] != "":
                log_clinical[y] += norm.logpdf(float(row["size"]), spec.size_shift * y)
            if row["grade"] != "":
                edges = [-np.inf, *GRADE_CUTS, np.inf]
                g, mean = int(row["grade"]), spec.grade_shift * (y >= 1)
                log_clinical[y] += np.log(norm.cdf(edges[g] - mean) - norm.cdf(edges[g - 1] - mean))
        prior = np.log(spec.prior)
        for got, joint in (
            (absent[i], prior + log_bag),
            (present[i], prior + log_bag + log_clinical),
        ):
            np.testing.assert_allclose(got, np.exp(joint - logsumexp(joint)), rtol=1e-9)
