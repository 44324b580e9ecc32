"""ClinicalEncoder: train-only fitting, the encoding per kind, indicators, JSON round trip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bidistill.cohort import ClinicalEncoder, load_cohort
from bidistill.config import ClinicalColumn

COLUMNS = [
    ClinicalColumn(column="age", kind="numeric"),
    ClinicalColumn(column="er", kind="binary", positive=["Positive"]),
    ClinicalColumn(column="grade", kind="ordinal", categories=["1", "2", "3"]),
    ClinicalColumn(column="subtype", kind="categorical"),
]
TRAIN = pd.DataFrame(
    {
        "age": [40.0, 50.0, 60.0, np.nan],
        "er": ["Positive", "Negative", "Positive", "Positive"],
        "grade": ["1", "3", np.nan, "2"],
        "subtype": ["A", "B", "A", np.nan],
    }
)


def test_encoding_per_kind_with_missing_indicators():
    enc = ClinicalEncoder(COLUMNS).fit(TRAIN)
    assert enc.n_values_ == 1 + 1 + 1 + 2 and enc.n_outputs_ == 5 + 4
    assert enc.output_names_[:5] == ["age", "er", "grade", "subtype=A", "subtype=B"]
    out = enc.transform(TRAIN)
    std = np.std([40.0, 50.0, 60.0])
    np.testing.assert_allclose(out.values[:3, 0], [-10 / std, 0, 10 / std], rtol=1e-6)
    assert out.values[3, 0] == 0  # missing numeric → training mean → 0
    np.testing.assert_array_equal(out.values[:, 1], [1, 0, 1, 1])
    np.testing.assert_allclose(out.values[[0, 1, 3], 2], [0, 1, 0.5])
    assert out.values[2, 2] == pytest.approx(0.5)  # missing ordinal → training mean (1+0+.5)/3
    np.testing.assert_array_equal(out.values[:, 3:5], [[1, 0], [0, 1], [1, 0], [0, 0]])
    # indicators: 1 where missing
    np.testing.assert_array_equal(out.values[:, 5:], ~out.valid)
    np.testing.assert_array_equal(out.valid[3], [False, True, True, False])
    assert out.present.all()


def test_fit_uses_only_the_rows_it_is_given():
    """Statistics come from the training rows: test rows never move them."""
    enc = ClinicalEncoder(COLUMNS).fit(TRAIN)
    outlier = TRAIN.assign(age=[1000.0, 2000.0, 3000.0, 4000.0])
    before = enc.transform(TRAIN).values.copy()
    enc.transform(outlier)
    np.testing.assert_array_equal(enc.transform(TRAIN).values, before)
    assert enc.stats_[0]["mean"] == pytest.approx(50.0)


def test_unseen_category_is_missing_with_a_warning():
    enc = ClinicalEncoder(COLUMNS).fit(TRAIN)
    new = TRAIN.iloc[:1].assign(subtype="C")
    with pytest.warns(UserWarning, match=r"'subtype': \['C'\] not seen in training"):
        out = enc.transform(new)
    assert not out.valid[0, 3] and out.values[0, 3:5].sum() == 0 and out.values[0, 8] == 1


def test_all_blank_patient_has_clinical_absent():
    enc = ClinicalEncoder(COLUMNS).fit(TRAIN)
    out = enc.missing_row(2)
    assert not out.present.any() and not out.valid.any()
    np.testing.assert_array_equal(out.values[:, enc.n_values_ :], 1)


def test_json_round_trip_gives_identical_output(tmp_path, synth_cohort):
    from bidistill.config import load_config

    cfg = load_config(synth_cohort)
    cohort = load_cohort(cfg.cohort)
    train = cohort.patients[cohort.patients["split"] == "train"]
    enc = ClinicalEncoder(cohort.columns).fit(train[cohort.feature_names])
    enc.save(tmp_path / "enc.json")
    again = ClinicalEncoder.load(tmp_path / "enc.json")
    a, b = enc.transform(cohort.clinical_frame), again.transform(cohort.clinical_frame)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.valid, b.valid)
    assert again.output_names_ == enc.output_names_


def test_transform_before_fit_is_an_error():
    with pytest.raises(RuntimeError, match="not fitted"):
        ClinicalEncoder(COLUMNS).transform(TRAIN)
