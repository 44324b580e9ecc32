"""K-class labels: the config's `classes` form, the cohort's class codes, the leakage guard."""

from __future__ import annotations

import pandas as pd
import pytest
from pydantic import ValidationError

from bidistill.cohort.guard import check_separating_features
from bidistill.cohort.table import load_cohort
from bidistill.config import ClinicalColumn, CohortConfig, LabelConfig
from bidistill.errors import CohortError

ALN3 = {"N0": ["N0"], "N+(1-2)": ["N+(1-2)", "N1-2"], "N+(>2)": ["N+(>2)"]}


def test_classes_name_their_values_in_code_order():
    label = LabelConfig(column="ALN status", classes=ALN3)
    assert label.n_classes == 3 and not label.binary
    assert label.class_names == ["N0", "N+(1-2)", "N+(>2)"]
    assert label.describe() == "'ALN status' (N0 vs N+(1-2) vs N+(>2))"


def test_two_classes_are_the_binary_task_with_the_second_positive():
    label = LabelConfig(column="x", classes={"neg": ["a"], "pos": ["b", "c"]})
    assert label.binary and label.positive_class == "pos" and label.negative_class == "neg"
    assert label.class_values == [["a"], ["b", "c"]]


def test_the_binary_form_is_unchanged():
    label = LabelConfig(column="x", positive=["N+(1-2)", "N+(>2)"])
    assert label.class_names == ["not (N+(1-2) or N+(>2))", "N+(1-2) or N+(>2)"]
    assert label.class_values is None  # 0 is every other value


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({}, "either as 'positive'"),
        ({"positive": ["a"], "classes": ALN3}, "not both"),
        ({"classes": {"only": ["a"]}}, "two or more classes"),
        ({"classes": {"a": ["a"], "b": []}}, "list no values"),
        ({"classes": ALN3, "negative": ["N0"]}, "belong to the binary form"),
    ],
)
def test_a_malformed_label_is_refused_with_what_to_change(given, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")):
        LabelConfig(column="x", **given)


def _cohort(tmp_path, values, **label):
    rows = [
        {"patient": f"P{i}", "outcome": v, "age": 40 + i, "split": ["train", "val", "test"][i % 3]}
        for i, v in enumerate(values)
    ]
    table = tmp_path / "cohort.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    cfg = {
        "table": str(table),
        "patient_column": "patient",
        "split_column": "split",
        "label": {"column": "outcome", **label},
        "clinical": [{"column": "age", "kind": "numeric"}],
    }
    return table, CohortConfig.model_validate(cfg)


def test_cohort_codes_follow_the_classes_and_merge_spellings(tmp_path):
    values = ["N0", "n+(1-2)", "N1-2", "N+(>2)", "", "N0"]
    _, cfg = _cohort(tmp_path, values, classes=ALN3)
    cohort = load_cohort(cfg)
    codes = cohort.labels.to_dict()
    assert codes == {"P0": 0, "P1": 1, "P2": 1, "P3": 2, "P5": 0}  # P4: blank, left out
    summary = cohort.label_summary.format()
    assert "'N1-2'    → 1 (N+(1-2)) (1)" in summary
    assert "1 patient with a blank label is left out" in summary


def test_unlisted_values_stop_the_run_or_are_dropped_as_configured(tmp_path):
    values = ["N0", "N+(1-2)", "N+(>2)", "Nx", "Nx"]
    table, cfg = _cohort(tmp_path, values, classes=ALN3)
    with pytest.raises(CohortError) as err:
        load_cohort(cfg)
    assert str(table) in str(err.value)
    assert "'Nx' (2 patients; rows 5, 6)" in str(err.value)
    assert "in any of label.classes" in str(err.value)
    _, dropping = _cohort(tmp_path, values, classes=ALN3, unlisted="drop")
    cohort = load_cohort(dropping)
    assert sorted(cohort.labels.index) == ["P0", "P1", "P2"]
    assert "left out 2 patients whose label is in no list: 'Nx' (2)" in (
        cohort.label_summary.format()
    )


def test_a_value_listed_for_two_classes_is_refused(tmp_path):
    _, cfg = _cohort(tmp_path, ["a", "b"], classes={"x": ["a"], "y": ["b", "A"]})
    with pytest.raises(CohortError, match="'a' is listed for both 'x' and 'y'"):
        load_cohort(cfg)


def test_the_leakage_guard_refuses_a_feature_that_singles_out_one_class():
    labels = pd.Series([0] * 20 + [1] * 20 + [2] * 20)
    # Separates class 2 from the rest perfectly, classes 0 and 1 not at all.
    leaky = pd.Series([str(v) for v in [0.0, 1.0] * 20 + [5.0] * 20])
    frame = pd.DataFrame({"leaky": leaky})
    column = ClinicalColumn(column="leaky", kind="numeric")
    with pytest.raises(CohortError, match="'leaky' alone separates"):
        check_separating_features(frame, labels, [column])
    assert check_separating_features(frame, labels, [column], allow=["leaky"])["leaky"] == 1.0
