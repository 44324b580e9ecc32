"""``evaluate`` on damaged run folders, and data text in the report."""

from __future__ import annotations

import re

import pandas as pd

from .conftest import Snapshot, assert_one_line_error, edit_config, invoke, small_cohort


def test_evaluate_refuses_predictions_with_test_rows_deleted(run_copy):
    _, run_dir = run_copy
    path = run_dir / "wsi-only" / "predictions.csv"
    rows = pd.read_csv(path, dtype={"patient_id": str})
    gone = rows[rows["split"] == "test"].iloc[:3]
    rows.drop(gone.index).to_csv(path, index=False)
    snapshot = Snapshot(run_dir)
    result = invoke("evaluate", run_dir)
    assert_one_line_error(
        result, str(path), "3 test patients of splits.json have no prediction", gone.iloc[0, 0]
    )
    snapshot.assert_nothing_lost()  # metrics.csv and the report are as they were


def test_evaluate_refuses_predictions_of_patients_outside_the_splits(run_copy):
    _, run_dir = run_copy
    path = run_dir / "clinical-only" / "predictions.csv"
    rows = pd.read_csv(path, dtype={"patient_id": str})
    extra = rows[rows["split"] == "val"].iloc[[0]].assign(patient_id="STRANGER")
    pd.concat([rows, extra]).to_csv(path, index=False)
    result = invoke("evaluate", run_dir)
    assert_one_line_error(result, "1 val patient is not in splits.json (STRANGER)")


def test_column_names_cannot_inject_markup_into_the_report(tmp_path):
    config = small_cohort(tmp_path / "cohort", methods=["clinical-only"])
    rows = pd.read_csv(config.parent / "cohort.csv", dtype=str, keep_default_na=False)
    name = "<script>alert(1)</script>|`x`"
    rows.rename(columns={"age": name}).to_csv(config.parent / "cohort.csv", index=False)
    edit_config(config, lambda raw: raw["cohort"]["clinical"][0].update(column=name))
    result = invoke("run", config, "--out", tmp_path / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "run" / "report.md").read_text()
    outside_code = re.sub(r"(`{3,})yaml\n.*?\n\1", "", markdown, flags=re.S)
    assert "<script>" not in outside_code
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\\|\\`x\\`" in outside_code
    assert "<script>" not in (tmp_path / "run" / "report.html").read_text()
