"""Leakage guard: a feature that alone separates the training labels stops the run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bidistill.cohort import check_separating_features
from bidistill.config import ClinicalColumn
from bidistill.errors import CohortError

rng = np.random.default_rng(0)
LABELS = pd.Series(rng.integers(0, 2, 200))
FRAME = pd.DataFrame(
    {
        "age": rng.normal(55, 10, 200) + 3 * LABELS,  # a real but weak predictor
        "nodes": LABELS * rng.integers(1, 9, 200),  # the label in disguise
        "surgery": np.where(LABELS == 1, "Dissection", "Sentinel"),
    }
)
AGE = ClinicalColumn(column="age", kind="numeric")
NODES = ClinicalColumn(column="nodes", kind="numeric")
SURGERY = ClinicalColumn(column="surgery", kind="categorical")


def test_weak_predictor_passes_and_its_auc_is_reported():
    aucs = check_separating_features(FRAME, LABELS, [AGE])
    assert 0.5 < aucs["age"] < 0.8


@pytest.mark.parametrize("column", [NODES, SURGERY])
def test_separating_feature_stops_the_run_naming_it(column):
    with pytest.raises(CohortError, match=rf"'{column.column}' alone separates.*AUC 1.000"):
        check_separating_features(FRAME, LABELS, [AGE, column])


def test_separating_feature_allowed_explicitly():
    aucs = check_separating_features(FRAME, LABELS, [NODES], allow=["nodes"])
    assert aucs["nodes"] == pytest.approx(1.0)


def test_reversed_direction_is_caught_too():
    reversed_nodes = FRAME.assign(nodes=-FRAME["nodes"])
    with pytest.raises(CohortError, match="'nodes' alone separates"):
        check_separating_features(reversed_nodes, LABELS, [NODES])


def test_blank_cells_are_ignored():
    with_blanks = FRAME.assign(age=FRAME["age"].where(rng.random(200) > 0.3))
    assert "age" in check_separating_features(with_blanks, LABELS, [AGE])


def test_tiny_classes_are_not_judged():
    """Three positives separated by chance are no evidence of leakage."""
    labels = pd.Series([1, 1, 1] + [0] * 30)
    frame = pd.DataFrame({"age": [90.0, 91.0, 92.0] + list(range(40, 70))})
    assert check_separating_features(frame, labels, [AGE]) == {}
