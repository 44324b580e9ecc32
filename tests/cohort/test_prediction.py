"""Tables of new patients: the training table's layout, labels not needed."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from bidistill.cohort import load_cohort
from bidistill.cohort.prediction import load_prediction_cohort
from bidistill.config import load_config
from bidistill.errors import CohortError


def test_the_training_table_loads_with_the_same_values(synth_cohort):
    cfg = load_config(synth_cohort).cohort
    trained = load_cohort(cfg)
    new = load_prediction_cohort(cfg.table, cfg)
    assert sorted(new.patients.index) == sorted(trained.patients.index)
    pd.testing.assert_frame_equal(
        new.patients.loc[trained.patients.index], trained.clinical_frame, check_dtype=False
    )
    expected = {str(p): sorted(s) for p, s in trained.slides.groupby("patient_id")["slide_id"]}
    assert {p: sorted(s) for p, s in new.slides_of().items()} == expected
    assert sorted(new.slides["slide_id"]) == sorted(trained.slides["slide_id"])
    assert new.missing_columns == []


def test_a_table_without_labels_splits_and_some_columns(synth_cohort, tmp_path, caplog):
    cfg = load_config(synth_cohort).cohort
    table = pd.read_csv(cfg.table, dtype=str, keep_default_na=False)
    table = table.drop(columns=["nodal_status", "split", "positive_nodes", "ki67"])
    table.to_csv(tmp_path / "new.csv", index=False)
    with caplog.at_level(logging.WARNING):
        new = load_prediction_cohort(tmp_path / "new.csv", cfg)
    assert "ki67" in caplog.text and new.missing_columns == ["ki67"]
    assert new.patients["ki67"].isna().all()
    assert new.patients["age"].notna().mean() > 0.8  # the other columns are read as in training


def test_a_column_the_run_never_saw_is_refused_with_a_hint(synth_cohort, tmp_path):
    cfg = load_config(synth_cohort).cohort
    table = pd.read_csv(cfg.table, dtype=str, keep_default_na=False)
    table = table.rename(columns={"tumour_size_cm": "tumor_size_cm"})
    table.to_csv(tmp_path / "new.csv", index=False)
    with pytest.raises(CohortError, match="'tumor_size_cm'.*Did you mean 'tumour_size_cm'"):
        load_prediction_cohort(tmp_path / "new.csv", cfg)


def test_rows_of_a_patient_must_agree_and_cells_must_parse(synth_cohort):
    cfg = load_config(synth_cohort).cohort
    frame = pd.DataFrame({"patient_id": ["N1", "N1"], "slide_id": ["a", "b"], "age": ["50", "61"]})
    with pytest.raises(CohortError, match="patient 'N1'.*'age'.*rows 2, 3"):
        load_prediction_cohort(frame, cfg)
    frame = pd.DataFrame({"patient_id": ["N1"], "slide_id": ["a"], "grade": ["4"]})
    with pytest.raises(CohortError, match="row 2, column 'grade'"):
        load_prediction_cohort(frame, cfg)


def test_a_data_frame_loads_like_a_file(synth_cohort):
    cfg = load_config(synth_cohort).cohort
    frame = pd.DataFrame(
        {"patient_id": ["N1", "N1", "N2"], "slide_id": ["a", "b", "c"], "age": [50, np.nan, None]}
    )
    new = load_prediction_cohort(frame, cfg)
    assert new.slides_of() == {"N1": ["a", "b"], "N2": ["c"]}
    assert new.patients.loc["N1", "age"] == 50 and np.isnan(new.patients.loc["N2", "age"])
    with pytest.raises(CohortError, match="no patient id column 'patient_id'"):
        load_prediction_cohort(frame.drop(columns="patient_id"), cfg)


def test_identifiers_are_read_exactly_as_in_training(synth_cohort, tmp_path):
    """Training compares ids exactly (issue 10); prediction must too, or a full-width id would
    silently become another patient's."""
    cfg = load_config(synth_cohort).cohort
    table = pd.read_csv(cfg.table, dtype=str, keep_default_na=False)
    first = table[cfg.patient_column].iloc[0]
    wide = first.translate({ord(c): ord(c) + 0xFEE0 for c in "0123456789"})
    table.loc[0, cfg.patient_column] = wide
    table.to_csv(tmp_path / "new.csv", index=False)
    new = load_prediction_cohort(tmp_path / "new.csv", cfg)
    assert wide in new.patients.index and wide != first
    table.loc[0, cfg.slide_column] = "../elsewhere/S0001"
    table.to_csv(tmp_path / "new.csv", index=False)
    with pytest.raises(CohortError, match="row 2, column 'slide_id'"):
        load_prediction_cohort(tmp_path / "new.csv", cfg)
