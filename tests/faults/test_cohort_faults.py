"""Labels, identifiers and splits: refused (or shown) before any work."""

from __future__ import annotations

import re
import unicodedata

import pandas as pd
import pytest

from bidistill.cohort import load_cohort
from bidistill.config import load_config
from bidistill.features import FeatureStore

from .conftest import Snapshot, assert_one_line_error, edit_config, invoke, small_cohort, table


def _write_table(config, rows: pd.DataFrame) -> None:
    rows.to_csv(config.parent / "cohort.csv", index=False)


def _relabel(config, patients: list[str], value: str) -> None:
    rows = table(config)
    rows.loc[rows["patient_id"].isin(patients), "nodal_status"] = value
    _write_table(config, rows)


def _patients(config, n: int, label: str = "N0") -> list[str]:
    rows = table(config)
    return rows.loc[rows["nodal_status"] == label, "patient_id"].iloc[:n].tolist()


# --- labels -------------------------------------------------------------------------------------


def test_label_typo_is_an_error_listing_each_value_and_count(tmp_path):
    config = small_cohort(tmp_path / "cohort")
    _relabel(config, _patients(config, 8), "N 0")
    _relabel(config, _patients(config, 1, "N+"), "n/+")
    snapshot = Snapshot(tmp_path / "cohort")
    result = invoke("run", config, "--out", tmp_path / "run")
    line = assert_one_line_error(
        result, "cohort.csv: column 'nodal_status': 2 label value(s) in neither", "label.unlisted"
    )
    assert "'N 0' (8 patients; rows" in line and "'n/+' (1 patient; rows" in line
    assert not any((tmp_path / "run").glob("*/predictions.csv"))  # nothing trained
    snapshot.assert_nothing_lost()


def test_unlisted_labels_dropped_on_request_are_counted_on_the_console(tmp_path):
    config = small_cohort(tmp_path / "cohort", methods=["clinical-only"])
    _relabel(config, _patients(config, 3), "N 0")
    edit_config(config, lambda raw: raw["cohort"]["label"].update(unlisted="drop"))
    result = invoke("run", config, "--out", tmp_path / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (
        "label.unlisted: drop: left out 3 patients whose label is in neither list: 'N 0' (3)"
        in (result.output)
    )
    assert re.search(r"'N\+' +→ 1 \(positive\) \(\d+\)", result.output)
    assert re.search(r"'N0' +→ 0 \(negative\) \(\d+\)", result.output)


def test_without_negative_the_table_shows_what_becomes_0(tmp_path):
    config = small_cohort(tmp_path / "cohort")
    _relabel(config, _patients(config, 2, "N+"), "N +")  # a typo of N+: trained as 0
    edit_config(config, lambda raw: raw["cohort"]["label"].pop("negative"))
    shown = load_cohort(load_config(config).cohort).label_summary.format()
    assert re.search(r"'N \+' +→ 0 \(negative\) \(2\)", shown)


# --- identifiers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "slide_id,fragment",
    [
        ("../elsewhere/S0026", "path separator"),
        ("/etc/S0026", "path separator"),
        ("..", "names a folder"),
        ("S00\u200b26", "invisible character U+200B"),
        ("S0026\tx", "invisible character U+0009"),
    ],
    ids=["dotdot", "absolute", "parent", "zero-width", "tab"],
)
def test_slide_ids_that_leave_their_folder_are_refused(tmp_path, slide_id, fragment):
    config = small_cohort(tmp_path / "cohort")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    rows = table(config)
    rows.loc[3, "slide_id"] = slide_id
    _write_table(config, rows)
    result = invoke("run", config, "--out", tmp_path / "run")
    assert_one_line_error(result, "row 5, column 'slide_id'", fragment)
    assert not any((tmp_path / "run").glob("*/predictions.csv"))


def test_feature_path_refuses_an_escaping_id(tmp_path):
    from bidistill._paths import PathOutsideFolderError
    from bidistill.features import feature_path

    with pytest.raises(PathOutsideFolderError, match="outside the configured folder"):
        feature_path(tmp_path / "features", "../S0001")


def test_identifiers_are_compared_exactly(tmp_path):
    config = small_cohort(tmp_path / "cohort")
    rows = table(config)
    first = rows.loc[0, "patient_id"]  # e.g. P0007: a full-width twin is another patient
    twin = first[0] + "".join(chr(ord(c) + 0xFEE0) for c in first[1:])
    extra = rows.iloc[[0]].assign(patient_id=twin, slide_id="TWIN")
    _write_table(config, pd.concat([rows, extra], ignore_index=True))
    cohort = load_cohort(load_config(config).cohort)
    assert {first, twin} <= set(cohort.patients.index)
    assert len(cohort.patients) == len(rows) + 1


def test_ids_that_differ_only_in_unicode_composition_are_refused(tmp_path):
    config = small_cohort(tmp_path / "cohort")
    rows = table(config)
    rows.loc[0, "patient_id"] = unicodedata.normalize("NFC", "Pé1")
    rows.loc[1, "patient_id"] = unicodedata.normalize("NFD", "Pé1")
    _write_table(config, rows)
    result = invoke("run", config, "--out", tmp_path / "run")
    assert_one_line_error(result, "column 'patient_id'", "differ only in their Unicode composition")


def test_feature_file_in_nfd_is_found_for_an_nfc_id(tmp_path):
    from bidistill.features import write_feature_file

    nfc = unicodedata.normalize("NFC", "Sé-1")
    features = tmp_path / "features"
    write_feature_file(
        features / f"{unicodedata.normalize('NFD', nfc)}.h5",
        __import__("numpy").ones((3, 4), "float32"),
        __import__("numpy").zeros((3, 2), "int64"),
        encoder="x",
        patch_size=256,
        mpp=0.5,
    )
    store = FeatureStore(features, [nfc])
    assert store.get(nfc).shape == (3, 4)


# --- splits and clinical data -------------------------------------------------------------------


def test_a_test_split_with_one_class_fails_before_training(tmp_path):
    config = small_cohort(tmp_path / "cohort")
    rows = table(config)
    rows.loc[(rows["split"] == "test") & (rows["nodal_status"] == "N+"), "split"] = "train"
    _write_table(config, rows)
    result = invoke("run", config, "--out", tmp_path / "run")
    assert_one_line_error(result, "the test split has", "all of class 0", "AUC needs both classes")
    assert not any((tmp_path / "run").glob("*/predictions.csv"))


def test_a_clinical_column_blank_for_all_training_patients_fails_before_training(tmp_path):
    config = small_cohort(tmp_path / "cohort")
    rows = table(config)
    rows.loc[rows["split"] == "train", "ki67"] = ""
    _write_table(config, rows)
    result = invoke("run", config, "--out", tmp_path / "run")
    assert_one_line_error(result, "['ki67'] are blank for every training patient")


def test_an_all_blank_clinical_table_fails_before_training(tmp_path):
    config = small_cohort(tmp_path / "cohort")
    rows = table(config)
    for column in ("age", "tumour_size_cm", "er", "grade", "ki67", "subtype"):
        rows[column] = ""
    _write_table(config, rows)
    result = invoke("run", config, "--out", tmp_path / "run")
    assert_one_line_error(result, "are blank for every training patient")
