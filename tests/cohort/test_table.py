"""Loading cohort tables: the happy path on CSV and XLSX, and every bad-input error."""

from __future__ import annotations

import pandas as pd
import pytest

from bidistill.cohort import load_cohort
from bidistill.config import CohortConfig
from bidistill.errors import CohortError

ROWS = [
    # patient, slide, status, split, age, ki67, grade, er, subtype
    ("P1", "S1a", "N+", "train", "61", "30-40%", "3", "Positive", "Luminal B"),
    ("P2", "S2", "N0", "train", "48", "＜5%", "1", "Negative", "Luminal A"),
    ("P1", "S1b", "N+", "train", "", "30-40%", "3", "Positive", "Luminal B"),
    ("P3", "S3", "N0", "val", "55,5", "0.2", "", "Positive", "Luminal A"),
    ("P4", "S4", "N+", "val", " 70 ", "＞30%", "2", "", "HER2(+)"),
    ("P5", "S5", "N0", "test", "39", "10%", "2", "Negative", ""),
    ("P6", "S6", "N+", "test", "", "", "", "", ""),
]
COLUMNS = ["pid", "slide", "status", "split", "age", "ki67", "grade", "er", "subtype"]


def cohort_config(table, **overrides) -> CohortConfig:
    raw = {
        "table": str(table),
        "patient_column": "pid",
        "slide_column": "slide",
        "label": {"column": "status", "positive": ["N+"], "negative": ["N0"]},
        "split_column": "split",
        "clinical": [
            {"column": "age", "kind": "numeric", "parser": "number"},
            {"column": "ki67", "kind": "numeric", "parser": "percent"},
            {"column": "grade", "kind": "ordinal", "categories": ["1", "2", "3"]},
            {"column": "er", "kind": "binary", "positive": ["Positive"]},
            {"column": "subtype", "kind": "categorical"},
        ],
    }
    raw.update(overrides)
    return CohortConfig.model_validate(raw)


def write(tmp_path, rows=ROWS, columns=COLUMNS, name="cohort.csv"):
    path = tmp_path / name
    frame = pd.DataFrame(rows, columns=columns)
    if name.endswith(".xlsx"):
        frame.to_excel(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def test_loads_patients_slides_and_parsed_values(tmp_path):
    cohort = load_cohort(cohort_config(write(tmp_path)))
    p = cohort.patients
    assert list(p.index) == ["P1", "P2", "P3", "P4", "P5", "P6"]
    assert p.loc["P1", "label"] == 1 and p.loc["P2", "label"] == 0
    # P1's blank age in its second row is filled by its first row.
    assert p.loc["P1", "age"] == 61.0
    assert p.loc["P3", "age"] == 55.5
    assert p.loc["P4", "age"] == 70.0
    assert p.loc["P2", "ki67"] == pytest.approx(0.05)
    assert p.loc["P1", "ki67"] == pytest.approx(0.35)
    assert pd.isna(p.loc["P3", "grade"]) and p.loc["P4", "grade"] == "2"
    assert p.loc["P3", "split"] == "val"
    assert cohort.slides_of("P1") == ["S1a", "S1b"]
    assert len(cohort.slides) == 7
    assert p.loc["P6", cohort.feature_names].isna().all()


def test_xlsx_with_numeric_cells_reads_like_csv(tmp_path):
    rows = [list(r) for r in ROWS]
    for r in rows:  # Excel stores numbers: grade 3 comes back as 3 (or 3.0), age as 61
        r[6] = int(r[6]) if r[6] else None
        r[4] = float(r[4].replace(",", ".")) if r[4].strip() else None
    csv = load_cohort(cohort_config(write(tmp_path)))
    xlsx = load_cohort(cohort_config(write(tmp_path, rows, name="cohort.xlsx")))
    pd.testing.assert_frame_equal(csv.patients, xlsx.patients, check_dtype=False)


def test_label_values_outside_both_lists_are_an_error_unless_dropped(tmp_path):
    rows = [*ROWS, ("P7", "S7", "N+(>2)", "train", "50", "", "", "", "")]
    table = write(tmp_path, rows)
    with pytest.raises(CohortError, match=r"'N\+\(>2\)' \(1 patient; rows 9\)"):
        load_cohort(cohort_config(table))
    label = {"column": "status", "positive": ["N+"], "negative": ["N0"], "unlisted": "drop"}
    cohort = load_cohort(cohort_config(table, label=label))
    assert "P7" not in cohort.patients.index
    assert "S7" not in set(cohort.slides["slide_id"])
    assert cohort.label_summary.dropped == {"N+(>2)": 1}
    assert "left out 1 patient whose label is in neither list: 'N+(>2)' (1)" in (
        cohort.label_summary.format()
    )


def test_without_split_column_split_is_none(tmp_path):
    cohort = load_cohort(cohort_config(write(tmp_path), split_column=None))
    assert cohort.patients["split"].isna().all()


# --- bad input: each error names the file and what is wrong -------------------------------------


def test_missing_declared_column(tmp_path):
    cfg = cohort_config(write(tmp_path), clinical=[{"column": "Age(years)", "kind": "numeric"}])
    with pytest.raises(CohortError, match=r"cohort\.csv: column 'Age\(years\)'.*cohort.clinical"):
        load_cohort(cfg)


def test_unparseable_value_names_file_row_column_and_value(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[3][5] = "about twenty"  # P3's ki67, spreadsheet row 5
    with pytest.raises(CohortError, match=r"cohort\.csv: row 5, column 'ki67'.*'about twenty'"):
        load_cohort(cohort_config(write(tmp_path, rows)))


def test_ordinal_value_outside_levels(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[1][6] = "4"
    with pytest.raises(CohortError, match=r"row 3, column 'grade'.*'4'.*expected one of"):
        load_cohort(cohort_config(write(tmp_path, rows)))


def test_conflicting_labels_for_one_patient(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[2][2] = "N0"  # P1's second slide says N0
    with pytest.raises(CohortError, match=r"patient 'P1'.*conflicting.*'status'.*rows 2, 4"):
        load_cohort(cohort_config(write(tmp_path, rows)))


def test_conflicting_clinical_values_for_one_patient(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[2][7] = "Negative"
    with pytest.raises(CohortError, match=r"patient 'P1'.*conflicting.*'er'"):
        load_cohort(cohort_config(write(tmp_path, rows)))


def test_label_with_one_class(tmp_path):
    rows = [(*r[:2], "N0", *r[3:]) for r in ROWS]
    with pytest.raises(CohortError, match="one class"):
        load_cohort(cohort_config(write(tmp_path, rows)))


def test_duplicate_slide_ids(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[1][1] = "S1a"
    with pytest.raises(CohortError, match=r"slide id 'S1a'.*rows 2, 3"):
        load_cohort(cohort_config(write(tmp_path, rows)))


def test_unknown_split_value(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[0][3] = "holdout"
    with pytest.raises(CohortError, match=r"row 2, column 'split'.*'holdout'"):
        load_cohort(cohort_config(write(tmp_path, rows)))


def test_binary_column_with_three_values(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[4][7] = "Equivocal"
    with pytest.raises(CohortError, match="'er' is declared binary but has 3 values"):
        load_cohort(cohort_config(write(tmp_path, rows)))


def test_missing_table_file(tmp_path):
    with pytest.raises(CohortError, match="nope.csv: cohort table not found"):
        load_cohort(cohort_config(tmp_path / "nope.csv"))


def test_label_column_refused_as_feature(tmp_path):
    with pytest.raises(ValueError, match="'status' is the label column"):
        cohort_config(write(tmp_path), clinical=[{"column": "status", "kind": "categorical"}])


def test_leakage_column_refused_as_feature(tmp_path):
    with pytest.raises(ValueError, match="'nodes' is a leakage column"):
        cohort_config(
            write(tmp_path),
            leakage_columns=["nodes"],
            clinical=[{"column": "nodes", "kind": "numeric"}],
        )


def test_blank_label_on_a_later_row_is_filled_by_the_patient(tmp_path):
    # A merged label cell in a spreadsheet leaves the patient's second slide row blank.
    rows = [list(r) for r in ROWS]
    rows[2][2] = ""
    cohort = load_cohort(cohort_config(write(tmp_path, rows)))
    assert cohort.slides_of("P1") == ["S1a", "S1b"]
    assert cohort.patients.loc["P1", "label"] == 1


def test_patient_partly_outside_the_label_classes_is_refused(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[2][2] = "N+(>2)"  # P1: N+ on one slide row, an excluded class on the other
    label = {"column": "status", "positive": ["N+"], "negative": ["N0"], "unlisted": "drop"}
    with pytest.raises(CohortError, match=r"patient 'P1' has conflicting values.*'status'"):
        load_cohort(cohort_config(write(tmp_path, rows), label=label))


def test_binary_written_as_csv_floats_reads_like_excel(tmp_path):
    # pandas writes a float column (1.0 / 0.0 / NaN) to CSV as "1.0", "0.0" and "".
    rows = [list(r) for r in ROWS]
    for r in rows:
        r[7] = {"Positive": "1.0", "Negative": "0.0", "": ""}[r[7]]
    cohort = load_cohort(
        cohort_config(write(tmp_path, rows), clinical=[{"column": "er", "kind": "binary"}])
    )
    assert cohort.patients["er"].tolist()[:3] == ["1", "0", "1"]


def test_not_recorded_markers_are_blank_not_a_category(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[1][8] = "N/A"  # P2's subtype
    rows[1][4] = "NA"  # P2's age
    cohort = load_cohort(cohort_config(write(tmp_path, rows)))
    assert pd.isna(cohort.patients.loc["P2", "subtype"])
    assert pd.isna(cohort.patients.loc["P2", "age"])
