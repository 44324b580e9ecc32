"""`bidistill predict` and `bidistill heatmap` as a user runs them: outputs, warnings, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from bidistill.cli import app

from .helpers import altered_copy, new_patients_table, saved_predictions

runner = CliRunner()
pytestmark = pytest.mark.slow


def bidistill(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_shows_an_example():
    for command in ("predict", "heatmap"):
        result = bidistill(command, "--help")
        assert result.exit_code == 0 and "Example: bidistill " + command in result.output


def test_predict_writes_one_row_per_patient_and_says_what_next(demo_run, demo_cohort, tmp_path):
    table = new_patients_table(demo_cohort, tmp_path / "new.csv")
    out = tmp_path / "pred.csv"
    args = ["--run", demo_run, "--features", demo_cohort / "features", "--clinical", table]
    result = bidistill("predict", *args, "--out", out)
    assert result.exit_code == 0, result.output
    predicted = pd.read_csv(out, dtype={"patient_id": str}).set_index("patient_id")
    saved = saved_predictions(demo_run, "bd")
    np.testing.assert_array_equal(
        predicted.loc[saved.index, "probability"].astype(np.float32),
        saved["prob_present"].astype(np.float32),
    )
    assert list(predicted.columns) == [
        "method", "probability", "positive_class", "threshold", "decision", "predicted", "branch",
        "clinical_present", "clinical_missing", "slides", "tiles",
    ]  # fmt: skip
    assert f"predicted {len(saved)} patients with bd" in result.output
    assert "next: bidistill heatmap --run" in result.output


def test_unseen_categories_warn_and_unknown_columns_are_refused(demo_run, demo_cohort, tmp_path):
    table = pd.read_csv(new_patients_table(demo_cohort, tmp_path / "t.csv"), dtype=str)
    table.loc[table.index[0], "subtype"] = "Basal-like"
    table.to_csv(tmp_path / "unseen.csv", index=False)
    features = demo_cohort / "features"
    out = tmp_path / "pred.csv"
    result = bidistill("predict", "--run", demo_run, "--features", features,
                       "--clinical", tmp_path / "unseen.csv", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        "warning: clinical feature 'subtype': ['Basal-like'] not seen in training" in result.output
    )
    row = pd.read_csv(out, dtype=str, keep_default_na=False).iloc[0]
    assert "subtype" in row["clinical_missing"].split(";")

    table.assign(bmi="24.1").to_csv(tmp_path / "extra.csv", index=False)
    result = bidistill("predict", "--run", demo_run, "--features", features,
                       "--clinical", tmp_path / "extra.csv", "--out", out)  # fmt: skip
    assert result.exit_code == 1
    assert (
        "error: " in result.output
        and "extra.csv: column 'bmi' is not a column the run knows" in result.output
    )
    assert "Traceback" not in result.output


def test_foreign_features_and_newer_runs_are_refused(demo_run, demo_cohort, tmp_path):
    foreign = altered_copy(
        demo_cohort / "features" / "S0001.h5", tmp_path / "h5" / "S0001.h5", encoder="uni"
    )
    result = bidistill(
        "predict", "--run", demo_run, "--features", foreign, "--out", tmp_path / "p.csv"
    )
    assert result.exit_code == 1 and "encoder 'uni' (the run's: 'synthetic')" in result.output
    assert not (tmp_path / "p.csv").exists()

    newer = tmp_path / "run"
    shutil.copytree(demo_run / "bd", newer / "bd")
    shutil.copy(demo_run / "config.yaml", newer / "config.yaml")
    meta = json.loads((newer / "bd" / "model.json").read_text())
    (newer / "bd" / "model.json").write_text(json.dumps({**meta, "bidistill_version": "1.0"}))
    one = demo_cohort / "features" / "S0001.h5"
    result = bidistill("predict", "--run", newer, "--features", one, "--out", tmp_path / "p.csv")
    assert result.exit_code == 1 and "newer than this bidistill" in result.output


def test_heatmap_for_a_method_without_slides_is_refused(demo_run, demo_cohort, tmp_path):
    result = bidistill("heatmap", "--run", demo_run, "--method", "clinical-only",
                       "--features", demo_cohort / "features", "--out", tmp_path)  # fmt: skip
    assert result.exit_code == 1 and "clinical-only does not read slides" in result.output


def test_a_clinical_only_method_predicts_from_the_table_alone(demo_run, demo_cohort, tmp_path):
    table = new_patients_table(demo_cohort, tmp_path / "new.csv", drop=["ki67"])
    out = tmp_path / "pred.csv"
    result = bidistill("predict", "--run", demo_run, "--method", "clinical-only",
                       "--clinical", table, "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "'ki67': missing for every patient" in result.output
    predicted = pd.read_csv(out, dtype={"patient_id": str}).set_index("patient_id")
    assert set(predicted["branch"]) == {"clinical-only"} and (predicted["tiles"] == 0).all()
    result = bidistill("predict", "--run", demo_run, "--clinical", table, "--out", out)
    assert result.exit_code == 1 and "no features were given (--features)" in result.output
