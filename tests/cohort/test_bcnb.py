"""The BCNB adapter on real files in the BCNB layout (made by the synthetic generator)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from bidistill.cli import app
from bidistill.cohort import ClinicalEncoder, load_cohort, make_splits
from bidistill.cohort.bcnb import (
    FEATURE_SETS,
    TASKS,
    prepare_bcnb,
    read_clinical,
    read_splits,
)
from bidistill.config import load_config, parse_config
from bidistill.errors import CohortError, ConfigError
from bidistill.synthetic.bcnb import make_bcnb_folder

N_PATIENTS = 24
# Written out by hand (not read from bcnb.TASKS) so a wrong table entry fails here.
EXPECTED_TASKS = {
    "aln": ("ALN status", {"N+(1-2)", "N+(>2)"}, {"N0"}),
    "aln-n0-vs-1-2": ("ALN status", {"N+(1-2)"}, {"N0"}),
    "aln-n0-vs-gt2": ("ALN status", {"N+(>2)"}, {"N0"}),
    "er": ("ER", {"Positive"}, {"Negative"}),
    "pr": ("PR", {"Positive"}, {"Negative"}),
    "her2": ("HER2", {"Positive"}, {"Negative"}),
}
# K-class tasks: label column and each class's values, in code order.
EXPECTED_CLASS_TASKS = {
    "aln3": ("ALN status", {"N0": {"N0"}, "N+(1-2)": {"N+(1-2)"}, "N+(>2)": {"N+(>2)"}}),
    "subtype": (
        "Molecular subtype",
        {s: {s} for s in ("Luminal A", "Luminal B", "HER2(+)", "Triple negative")},
    ),
}
ALN_LEAKS = {"ALN status", "Number of lymph node metastases", "Surgical"}
EXPECTED_EXCLUDED = {  # columns that must never be features, per task
    "aln": ALN_LEAKS,
    "aln-n0-vs-1-2": ALN_LEAKS,
    "aln-n0-vs-gt2": ALN_LEAKS,
    "er": {"ER", "Molecular subtype"},
    "pr": {"PR", "Molecular subtype"},
    "her2": {"HER2", "HER2 Expression", "Molecular subtype"},
    "aln3": ALN_LEAKS,
    "subtype": {"Molecular subtype", "ER", "PR", "HER2", "HER2 Expression", "Ki67"},
}
ALL_FEATURES = {
    "age": "Age(years)",
    "tumour_size": "Tumour Size(cm)",
    "er": "ER",
    "pr": "PR",
    "her2": "HER2",
    "her2_expression": "HER2 Expression",
    "grade": "Histological grading",
    "ki67": "Ki67",
    "tumour_type": "Tumour Type",
    "subtype": "Molecular subtype",
}


@pytest.fixture(scope="module")
def bcnb_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bcnb")
    return make_bcnb_folder(
        out, patients=N_PATIENTS, seed=11, slide_size=(512, 512), progress=False
    )


@pytest.fixture
def root_copy(bcnb_root, tmp_path) -> Path:
    """A private copy of the BCNB folder that a test may damage."""
    return Path(shutil.copytree(bcnb_root, tmp_path / "bcnb"))


def _raw_table(root: Path) -> pd.DataFrame:
    frame = pd.read_excel(root / "patient-clinical-data.xlsx", dtype=object)
    frame["Patient ID"] = frame["Patient ID"].astype(str)
    return frame.set_index("Patient ID")


def _split_ids(root: Path) -> dict[str, list[str]]:
    return {
        split: (root / "dataset-splitting" / f"{split}_id.txt").read_text().split()
        for split in ("train", "val", "test")
    }


# --- the full round trip ------------------------------------------------------------------------


def test_prepare_gives_a_cohort_that_loads_splits_and_encodes(bcnb_root, tmp_path):
    report = prepare_bcnb(bcnb_root, tmp_path / "out")
    cfg = load_config(report.config_path)
    cohort = load_cohort(cfg.cohort)

    assert len(cohort.patients) == N_PATIENTS
    assert sorted(cohort.slides["slide_id"], key=int) == [str(i) for i in range(1, 25)]
    assert all(cohort.slides_of(pid) == [pid] for pid in cohort.patients.index)
    splits = make_splits(cohort, cfg.cohort.splits)
    official = _split_ids(bcnb_root)
    assert splits.mode == "table"
    assert sorted(splits.test) == sorted(official["test"])
    assert sorted(splits.folds[0].train) == sorted(official["train"])
    assert sorted(splits.folds[0].val) == sorted(official["val"])

    train = cohort.clinical_frame.loc[splits.folds[0].train]
    encoder = ClinicalEncoder(cfg.cohort.clinical).fit(train)
    encoded = encoder.transform(cohort.clinical_frame)
    assert encoded.values.shape[0] == N_PATIENTS and np.isfinite(encoded.values).all()
    assert encoder.n_features_ == 5
    assert encoded.present.all()


def test_config_points_at_the_slides_with_an_assumed_mpp(bcnb_root, tmp_path):
    report = prepare_bcnb(bcnb_root, tmp_path)
    text = report.config_path.read_text()
    cfg = load_config(report.config_path)
    assert cfg.slides.dir == (bcnb_root / "WSIs").resolve()
    assert cfg.slides.annotations_dir == (bcnb_root / "WSIs").resolve()
    assert cfg.slides.mpp == 0.5
    mpp_line = next(line for line in text.splitlines() if "mpp:" in line)
    assert "ASSUMED" in mpp_line and "check" in mpp_line
    assert cfg.cohort.table == (tmp_path / "cohort.csv").resolve()


def test_cohort_table_keeps_the_raw_bcnb_values(bcnb_root, tmp_path):
    report = prepare_bcnb(bcnb_root, tmp_path)
    table = pd.read_csv(report.table_path, dtype=str, keep_default_na=False)
    assert list(table.columns[:3]) == ["patient_id", "slide_id", "split"]
    assert "Patient ID" not in table.columns
    raw = _raw_table(bcnb_root)
    for _, row in table.iterrows():
        source = raw.loc[row["patient_id"]]
        assert row["ALN status"] == source["ALN status"]
        assert row["Ki67"] == ("" if pd.isna(source["Ki67"]) else str(source["Ki67"]))
        grade = source["Histological grading"]
        assert row["Histological grading"] == ("" if pd.isna(grade) else str(int(grade)))


def test_messy_values_are_parsed_by_the_generic_loader(tmp_path):
    root = make_bcnb_folder(tmp_path / "bcnb", patients=200, seed=0, slides=False, progress=False)
    report = prepare_bcnb(root, tmp_path / "out", feature_set="all")
    cohort = load_cohort(load_config(report.config_path).cohort)
    raw = _raw_table(root)
    ki67 = cohort.patients["ki67"]
    assert ki67.between(0, 1).sum() == ki67.notna().sum() > 150
    for sign, value in (("＜", 0.05), ("＞", 0.60)):
        censored = [pid for pid, v in raw["Ki67"].items() if isinstance(v, str) and sign in v]
        assert censored and (ki67.loc[censored] == value).all(), sign
    ranges = [pid for pid, v in raw["Ki67"].items() if isinstance(v, str) and "-" in v]
    assert ranges and ki67.loc[ranges].notna().all()
    assert cohort.patients["grade"].isna().sum() == raw["Histological grading"].isna().sum() > 0
    assert set(cohort.patients["grade"].dropna()) <= {"1", "2", "3"}
    assert set(cohort.patients["her2_expression"]) == {"0", "1+", "2+", "3+"}
    assert cohort.patients["tumour_size"].notna().all()


# --- tasks and feature sets ---------------------------------------------------------------------


def test_the_task_table_matches_the_expected_tasks():
    assert set(TASKS) == set(EXPECTED_TASKS) | set(EXPECTED_CLASS_TASKS)


@pytest.mark.parametrize("task", sorted(EXPECTED_TASKS))
def test_task_label_mapping(bcnb_root, tmp_path, task):
    label_column, positive, negative = EXPECTED_TASKS[task]
    report = prepare_bcnb(bcnb_root, tmp_path, task=task, feature_set="all")
    cohort = load_cohort(load_config(report.config_path).cohort)
    raw = _raw_table(bcnb_root)[label_column]
    expected = {pid: int(v in positive) for pid, v in raw.items() if v in positive | negative}
    assert cohort.labels.to_dict() == expected
    left_out = sum(v not in positive | negative for v in raw)
    assert report.label_counts["all"] == {
        "positive": sum(expected.values()),
        "negative": len(expected) - sum(expected.values()),
        "left out": left_out,
    }


@pytest.mark.parametrize("task", sorted(EXPECTED_CLASS_TASKS))
def test_class_task_label_mapping(bcnb_root, tmp_path, task):
    label_column, classes = EXPECTED_CLASS_TASKS[task]
    report = prepare_bcnb(bcnb_root, tmp_path, task=task, feature_set="all")
    cfg = load_config(report.config_path)
    assert cfg.cohort.label.class_names == list(classes)
    cohort = load_cohort(cfg.cohort)
    raw = _raw_table(bcnb_root)[label_column]
    code = {v: k for k, values in enumerate(classes.values()) for v in values}
    assert cohort.labels.to_dict() == {pid: code[v] for pid, v in raw.items()}
    assert report.label_counts["all"] == {
        **{name: int(sum(v in values for v in raw)) for name, values in classes.items()},
        "left out": 0,
    }
    text = report.format()
    assert f"label '{label_column}' classes" in text
    header = next(line for line in text.splitlines() if line.startswith("  split"))
    assert header.split()[1:] == [w for name in classes for w in name.split()] + ["left", "out"]


@pytest.mark.parametrize("task", sorted(EXPECTED_EXCLUDED))
@pytest.mark.parametrize("feature_set", ["balnmp5", "all"])
def test_features_never_include_leaking_columns(bcnb_root, tmp_path, task, feature_set):
    report = prepare_bcnb(bcnb_root, tmp_path, task=task, feature_set=feature_set)
    cfg = load_config(report.config_path)
    columns = {c.column for c in cfg.cohort.clinical}
    excluded = EXPECTED_EXCLUDED[task]
    assert not columns & excluded
    assert excluded <= {*cfg.cohort.leakage_columns, cfg.cohort.label.column}
    wanted = (
        ["age", "tumour_size", "er", "pr", "her2"]
        if feature_set == "balnmp5"
        else list(ALL_FEATURES)
    )
    kept = [name for name in wanted if ALL_FEATURES[name] not in excluded]
    assert [c.feature_name for c in cfg.cohort.clinical] == kept
    assert report.features == kept
    assert report.dropped_features == [n for n in wanted if n not in kept]


def test_feature_sets_are_the_documented_ones():
    assert FEATURE_SETS["balnmp5"] == ("age", "tumour_size", "er", "pr", "her2")
    assert set(FEATURE_SETS["all"]) == set(ALL_FEATURES)


def test_all_features_for_aln_keep_ten_columns_with_their_kinds(bcnb_root, tmp_path):
    cfg = load_config(prepare_bcnb(bcnb_root, tmp_path, feature_set="all").config_path)
    kinds = {c.feature_name: (c.column, c.kind, c.parser) for c in cfg.cohort.clinical}
    assert kinds == {
        "age": ("Age(years)", "numeric", None),
        "tumour_size": ("Tumour Size(cm)", "numeric", "number"),
        "er": ("ER", "binary", None),
        "pr": ("PR", "binary", None),
        "her2": ("HER2", "binary", None),
        "her2_expression": ("HER2 Expression", "ordinal", None),
        "grade": ("Histological grading", "ordinal", None),
        "ki67": ("Ki67", "numeric", "percent"),
        "tumour_type": ("Tumour Type", "categorical", None),
        "subtype": ("Molecular subtype", "categorical", None),
    }
    ordinal = {c.feature_name: c.categories for c in cfg.cohort.clinical if c.categories}
    assert ordinal == {"her2_expression": ["0", "1+", "2+", "3+"], "grade": ["1", "2", "3"]}


@pytest.mark.parametrize("leak", sorted(ALN_LEAKS))
def test_adding_an_aln_leak_as_feature_is_refused(bcnb_root, tmp_path, leak):
    report = prepare_bcnb(bcnb_root, tmp_path)
    raw = yaml.safe_load(report.config_path.read_text())
    raw["cohort"]["clinical"].append({"column": leak, "kind": "categorical"})
    with pytest.raises(ConfigError, match="reveals the label"):
        parse_config(raw)


def test_unknown_task_and_feature_set_name_the_choices(bcnb_root, tmp_path):
    with pytest.raises(CohortError, match="unknown BCNB task 'nodes'.*aln-n0-vs-gt2"):
        prepare_bcnb(bcnb_root, tmp_path, task="nodes")
    with pytest.raises(CohortError, match="unknown BCNB feature set 'five'.*balnmp5"):
        prepare_bcnb(bcnb_root, tmp_path, feature_set="five")


# --- without WSIs, and what prepare reports -----------------------------------------------------


def test_prepare_without_wsis_gives_a_clinical_only_cohort(root_copy, tmp_path):
    shutil.rmtree(root_copy / "WSIs")
    report = prepare_bcnb(root_copy, tmp_path / "out")
    cfg = load_config(report.config_path)
    assert cfg.slides is None and cfg.cohort.slide_column is None
    assert "slide_id" not in pd.read_csv(report.table_path).columns
    cohort = load_cohort(cfg.cohort)
    assert len(cohort.patients) == N_PATIENTS and cohort.slides.empty
    splits = make_splits(cohort, cfg.cohort.splits)
    encoder = ClinicalEncoder(cfg.cohort.clinical).fit(
        cohort.clinical_frame.loc[splits.folds[0].train]
    )
    assert encoder.transform(cohort.clinical_frame).values.shape[0] == N_PATIENTS
    assert "clinical-only" in report.format()


def test_report_states_what_prepare_found(bcnb_root, tmp_path):
    report = prepare_bcnb(bcnb_root, tmp_path)
    text = report.format()
    official = _split_ids(bcnb_root)
    status = _raw_table(bcnb_root)["ALN status"]
    assert f"patients: {N_PATIENTS} in patient-clinical-data.xlsx" in text
    assert f"slides: {N_PATIENTS} JPEGs, {N_PATIENTS} with tumour annotations" in text
    for split, ids in official.items():
        positives = sum(status[i] != "N0" for i in ids)
        row = next(line.split() for line in text.splitlines() if line.strip().startswith(split))
        assert row[1:4] == [str(positives), str(len(ids) - positives), "0"], split
    blank_grades = int(_raw_table(bcnb_root)["Histological grading"].isna().sum())
    grade_line = next(line for line in text.splitlines() if "Histological grading" in line)
    assert grade_line.split()[2] == str(blank_grades) and blank_grades > 0
    assert report.missing["Age(years)"] == 0
    assert str(report.table_path) in text and str(report.config_path) in text


def test_missing_slide_and_unsplit_patient_are_reported(root_copy, tmp_path):
    official = _split_ids(root_copy)
    no_slide, no_split = official["train"][0], official["test"][0]
    (root_copy / "WSIs" / f"{no_slide}.jpg").unlink()
    test_file = root_copy / "dataset-splitting" / "test_id.txt"
    test_file.write_bytes("".join(f"{i}\r\n" for i in official["test"][1:]).encode())

    report = prepare_bcnb(root_copy, tmp_path)
    assert report.patients_without_slide == [no_slide]
    assert report.patients_without_split == [no_split]
    text = report.format()
    assert f"1 patient has no slide: {no_slide}" in text
    assert f"1 patient in no split file, left out: {no_split}" in text
    cohort = load_cohort(load_config(report.config_path).cohort)
    assert no_split not in cohort.patients.index
    assert no_slide in cohort.patients.index and cohort.slides_of(no_slide) == []


def test_paper_patches_are_counted(root_copy, tmp_path):
    (root_copy / "paper_patches" / "2").mkdir(parents=True)
    (root_copy / "paper_patches" / "2" / "2_0.jpg").write_bytes(b"")
    (root_copy / "paper_patches" / "5").mkdir()
    report = prepare_bcnb(root_copy, tmp_path)
    assert report.paper_patches == 2 and "paper_patches: 2 patients" in report.format()


# --- split files --------------------------------------------------------------------------------


def test_split_files_with_crlf_bom_and_blank_lines_are_read(root_copy):
    split_dir = root_copy / "dataset-splitting"
    official = _split_ids(root_copy)
    assert b"\r\n" in (split_dir / "train_id.txt").read_bytes()
    (split_dir / "val_id.txt").write_bytes(
        b"\xef\xbb\xbf" + b"".join(f" {i} \r\n\r\n".encode() for i in official["val"])
    )
    splits = read_splits(root_copy, [str(i) for i in range(1, N_PATIENTS + 1)])
    assert sorted(p for p, s in splits.items() if s == "val") == sorted(official["val"])
    assert len(splits) == N_PATIENTS


def test_split_file_naming_an_unknown_patient_is_an_error(root_copy, tmp_path):
    path = root_copy / "dataset-splitting" / "val_id.txt"
    n_lines = len(path.read_text().split())
    path.write_bytes(path.read_bytes() + b"9999\r\n")
    with pytest.raises(CohortError) as err:
        prepare_bcnb(root_copy, tmp_path)
    message = str(err.value)
    assert "val_id.txt" in message and f"line {n_lines + 1}: '9999'" in message
    assert "patient-clinical-data.xlsx" in message


def test_patient_in_two_split_files_is_an_error(root_copy):
    official = _split_ids(root_copy)
    test_file = root_copy / "dataset-splitting" / "test_id.txt"
    test_file.write_bytes(test_file.read_bytes() + f"{official['train'][0]}\r\n".encode())
    with pytest.raises(CohortError, match=f"patient '{official['train'][0]}' is already in train"):
        read_splits(root_copy, [str(i) for i in range(1, N_PATIENTS + 1)])


def test_missing_split_file_is_named(root_copy):
    (root_copy / "dataset-splitting" / "val_id.txt").unlink()
    with pytest.raises(CohortError, match="val_id.txt: split file not found"):
        read_splits(root_copy, [str(i) for i in range(1, N_PATIENTS + 1)])


def test_without_split_files_the_table_has_no_split_column(root_copy, tmp_path):
    shutil.rmtree(root_copy / "dataset-splitting")
    report = prepare_bcnb(root_copy, tmp_path)
    cfg = load_config(report.config_path)
    assert cfg.cohort.split_column is None and cfg.cohort.splits.mode == "auto"
    assert "split" not in pd.read_csv(report.table_path).columns
    assert make_splits(load_cohort(cfg.cohort), cfg.cohort.splits).mode == "holdout"


# --- a malformed clinical table -----------------------------------------------------------------


def test_folder_without_the_xlsx_is_an_error(root_copy, tmp_path):
    (root_copy / "patient-clinical-data.xlsx").unlink()
    with pytest.raises(CohortError, match="patient-clinical-data.xlsx not found") as err:
        prepare_bcnb(root_copy, tmp_path)
    assert str(root_copy) in str(err.value)


def _edit_header(root: Path, edit) -> Path:
    path = root / "patient-clinical-data.xlsx"
    workbook = openpyxl.load_workbook(path)
    edit(workbook.worksheets[0])
    workbook.save(path)
    return path


def test_missing_column_is_named_with_the_file(root_copy, tmp_path):
    path = _edit_header(root_copy, lambda sheet: sheet.delete_cols(11))  # Ki67
    with pytest.raises(CohortError) as err:
        prepare_bcnb(root_copy, tmp_path)
    message = str(err.value)
    assert str(path) in message and "missing column 'Ki67'" in message


def test_misspelt_column_gets_a_hint(root_copy):
    def rename(sheet):
        sheet.cell(row=1, column=14).value = "ALN Status "

    _edit_header(root_copy, rename)
    with pytest.raises(CohortError, match=r"missing column 'ALN status' \(found 'ALN Status'\)"):
        read_clinical(root_copy)


def test_repeated_patient_id_names_the_rows(root_copy):
    def repeat(sheet):
        sheet.cell(row=5, column=1).value = 1

    _edit_header(root_copy, repeat)
    with pytest.raises(CohortError, match="'Patient ID' 1 appears on rows 2, 5"):
        read_clinical(root_copy)


def test_header_whitespace_and_extra_columns_are_tolerated(root_copy):
    def edit(sheet):
        sheet.cell(row=1, column=2).value = " Age(years) "
        sheet.cell(row=1, column=15).value = "Notes"
        sheet.cell(row=2, column=15).value = "free text"

    _edit_header(root_copy, edit)
    frame = read_clinical(root_copy)
    assert "Notes" not in frame.columns and len(frame.columns) == 14
    assert frame["Age(years)"].str.isdigit().all()


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_prepare_prints_the_report(bcnb_root, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "bcnb",
            "prepare",
            "--root",
            str(bcnb_root),
            "--out",
            str(tmp_path),
            "--task",
            "er",
            "--features",
            "all",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "task 'er'" in result.output and "dropped (reveal the label): er, subtype" in result.output
    )
    assert (tmp_path / "cohort.csv").is_file() and (tmp_path / "config.yaml").is_file()


def test_cli_prepare_fails_cleanly_on_a_bad_folder(tmp_path):
    result = CliRunner().invoke(
        app, ["bcnb", "prepare", "--root", str(tmp_path), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 1
    assert "patient-clinical-data.xlsx not found" in result.output
    assert "Traceback" not in result.output


def test_help_shows_examples():
    for command in (["bcnb", "prepare", "--help"], ["synth", "bcnb", "--help"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0 and "Example:" in result.output


def test_aln3_prepares_and_trains_a_clinical_only_three_class_model(tmp_path):
    root = make_bcnb_folder(tmp_path / "bcnb", patients=120, seed=2, slides=False, progress=False)
    report = prepare_bcnb(root, tmp_path / "out", task="aln3")
    config = report.config_path
    config.write_text(
        config.read_text()
        + "methods:\n  - name: clinical-linear\ntraining:\n  epochs: 3\n"
        + "evaluation:\n  bootstrap: 50\n  mask_seeds: 1\n"
    )
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert {"auc_0", "auc_1", "auc_2", "n_class_2"} <= set(metrics.columns)
    assert metrics["auc"].between(0, 1).all()
