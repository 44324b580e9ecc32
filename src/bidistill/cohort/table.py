"""Load a cohort table (CSV or XLSX, one row per slide) into a validated ``Cohort``.

The table holds a patient id, an optional slide id, a label column, an optional split column and
the clinical columns declared in the config. Labels and clinical values are per patient: rows of
one patient must agree, and a blank cell in one row is filled by the patient's other rows.
Every error names the file, and where it can, the row (as a spreadsheet shows it), the column and
the value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bidistill.cohort.parsers import PARSERS, is_blank, normalise_text
from bidistill.config import ClinicalColumn, ClinicalKind, CohortConfig
from bidistill.errors import CohortError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}
# Spreadsheet row of the first data row: row 1 holds the header.
_FIRST_ROW = 2
# Parsed label of a value outside both label lists (such rows leave the cohort).
_EXCLUDED = -1


@dataclass
class Cohort:
    """Patients with labels, clinical values and splits, and the slides of each patient.

    Attributes:
        patients: one row per patient, indexed by patient id, with ``label`` (0/1), ``split``
            (train/val/test, or None without a split column) and one column per clinical feature
            (float for numeric, text for the other kinds, NaN for blank).
        slides: one row per slide: ``slide_id``, ``patient_id`` (and ``mpp`` when configured).
        columns: the declared clinical columns, in order.
        source: the table file.
    """

    patients: pd.DataFrame
    slides: pd.DataFrame
    columns: list[ClinicalColumn]
    source: Path

    @property
    def labels(self) -> pd.Series:
        return self.patients["label"]

    @property
    def feature_names(self) -> list[str]:
        return [c.feature_name for c in self.columns]

    @property
    def clinical_frame(self) -> pd.DataFrame:
        return self.patients[self.feature_names]

    def slides_of(self, patient_id: str) -> list[str]:
        return self.slides.loc[self.slides["patient_id"] == patient_id, "slide_id"].tolist()

    def subset(self, patient_ids: list[str]) -> pd.DataFrame:
        """The patient rows of ``patient_ids``, in that order."""
        return self.patients.loc[patient_ids]


def read_table(path: Path, sheet: str | int | None = None) -> pd.DataFrame:
    """Read a CSV or XLSX with every cell as it is written (no type guessing for text)."""
    if not path.is_file():
        raise CohortError(f"{path}: cohort table not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".xlsx", ".xlsm", ".xls"):
            frame = pd.read_excel(path, sheet_name=sheet or 0, dtype=object)
        elif suffix in (".csv", ".tsv", ".txt"):
            sep = "\t" if suffix == ".tsv" else None
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, sep=sep, engine="python")
        else:
            raise CohortError(f"{path}: expected a .csv, .tsv or .xlsx cohort table")
    except CohortError:
        raise
    except Exception as err:  # pandas raises many types for unreadable files
        raise CohortError(f"{path}: cannot read the cohort table ({err})") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def load_cohort(cfg: CohortConfig, *, mpp_column: str | None = None) -> Cohort:
    """Read, check and assemble the cohort that ``cfg`` describes.

    Raises:
        CohortError: a declared column is absent, a cell cannot be parsed, a patient's rows
            disagree, a slide id repeats, the label has one class, or a split value is unknown.
    """
    path = Path(cfg.table)
    raw = read_table(path, cfg.sheet)
    _check_columns(raw, cfg, path, mpp_column)
    rows = raw.index.to_numpy() + _FIRST_ROW
    frame = pd.DataFrame(index=raw.index)
    frame["patient_id"] = [normalise_text(v) for v in raw[cfg.patient_column]]
    blank_ids = np.flatnonzero(frame["patient_id"].isin(["", "nan"]))
    if len(blank_ids):
        raise CohortError(
            f"{path}: row {rows[blank_ids[0]]}: blank patient id in '{cfg.patient_column}'"
        )
    frame["row"] = rows
    frame["label"] = _parse_labels(raw[cfg.label.column], cfg, path, rows)
    frame["split"] = _parse_splits(raw, cfg, path, rows)
    for col in cfg.clinical:
        frame[col.feature_name] = _parse_clinical(raw[col.column], col, path, rows)
    if cfg.slide_column:
        frame["slide_id"] = [
            None if is_blank(v) else normalise_text(v) for v in raw[cfg.slide_column]
        ]
    if mpp_column:
        frame["mpp"] = [
            PARSERS["number"](v) if not is_blank(v) else np.nan for v in raw[mpp_column]
        ]

    frame = _fill_patient_labels(frame, cfg, path)
    unlabelled = frame["label"].isna() | (frame["label"] == _EXCLUDED)
    if unlabelled.any():
        log.warning(
            "%s: %d rows left out: label '%s' blank or outside positive/negative values",
            path,
            int(unlabelled.sum()),
            cfg.label.column,
        )
        frame = frame[~unlabelled]
    patients = _per_patient(frame, cfg, path)
    slides = _slides(frame, cfg, path)
    if patients["label"].nunique() < 2:
        raise CohortError(
            f"{path}: label '{cfg.label.column}' has one class only "
            f"({int(patients['label'].iloc[0]) if len(patients) else 'no rows'}); "
            f"check label.positive={cfg.label.positive} against the column's values"
        )
    return Cohort(patients=patients, slides=slides, columns=list(cfg.clinical), source=path)


def _check_columns(raw: pd.DataFrame, cfg: CohortConfig, path: Path, mpp_column: str | None):
    declared = {
        "cohort.patient_column": [cfg.patient_column],
        "cohort.slide_column": [cfg.slide_column] if cfg.slide_column else [],
        "cohort.label.column": [cfg.label.column],
        "cohort.split_column": [cfg.split_column] if cfg.split_column else [],
        "cohort.clinical": [c.column for c in cfg.clinical],
        "slides.mpp_column": [mpp_column] if mpp_column else [],
    }
    for key, names in declared.items():
        for name in names:
            if name not in raw.columns:
                raise CohortError(
                    f"{path}: column '{name}' (declared in {key}) not found; the table has "
                    f"columns: {', '.join(map(repr, raw.columns))}"
                )


def _parse_labels(cells: pd.Series, cfg: CohortConfig, path: Path, rows: np.ndarray) -> list:
    positive = {normalise_text(v).casefold() for v in cfg.label.positive}
    negative = (
        {normalise_text(v).casefold() for v in cfg.label.negative}
        if cfg.label.negative is not None
        else None
    )
    overlap = positive & (negative or set())
    if overlap:
        raise CohortError(f"{path}: label values {sorted(overlap)} are both positive and negative")
    labels: list = []
    for cell in cells:
        value = normalise_text(cell).casefold() if not is_blank(cell) else None
        if value is None:
            labels.append(np.nan)
        elif value in positive:
            labels.append(1)
        elif negative is None or value in negative:
            labels.append(0)
        else:
            labels.append(_EXCLUDED)  # outside this task's classes, e.g. N+(>2) for N0 vs N+(1-2)
    return labels


def _fill_patient_labels(frame: pd.DataFrame, cfg: CohortConfig, path: Path) -> pd.DataFrame:
    """Fill a blank label cell from the patient's other rows (a merged cell in a spreadsheet
    leaves every row but the first blank), so that no slide of a labelled patient is lost; a
    patient whose rows are partly outside the task's classes is an error."""
    filled = frame.groupby("patient_id", sort=False)["label"].transform(lambda s: s.ffill().bfill())
    excluded = filled == _EXCLUDED
    mixed = excluded.groupby(frame["patient_id"]).transform(lambda s: 0 < s.sum() < len(s))
    if mixed.any():
        patient = frame.loc[mixed, "patient_id"].iloc[0]
        rows = ", ".join(str(r) for r in frame.loc[frame["patient_id"] == patient, "row"])
        raise CohortError(
            f"{path}: patient '{patient}' has conflicting values in column "
            f"'{cfg.label.column}' on rows {rows}: some are outside label.positive/negative"
        )
    return frame.assign(label=filled)


def _parse_splits(raw: pd.DataFrame, cfg: CohortConfig, path: Path, rows: np.ndarray) -> list:
    if not cfg.split_column:
        return [None] * len(raw)
    splits = []
    for row, cell in zip(rows, raw[cfg.split_column]):
        value = normalise_text(cell).casefold() if not is_blank(cell) else ""
        value = _SPLIT_ALIASES.get(value, value)
        if value not in SPLITS:
            raise CohortError(
                f"{path}: row {row}, column '{cfg.split_column}': split {cell!r} is not one of "
                f"{', '.join(SPLITS)}"
            )
        splits.append(value)
    return splits


def _parse_clinical(cells: pd.Series, col: ClinicalColumn, path: Path, rows: np.ndarray) -> list:
    values: list = []
    levels = {normalise_text(c) for c in col.categories} if col.categories else None
    for row, cell in zip(rows, cells):
        if is_blank(cell):
            values.append(np.nan)
            continue
        try:
            values.append(_parse_cell(cell, col, levels))
        except ValueError as err:
            raise CohortError(
                f"{path}: row {row}, column '{col.column}': cannot read {cell!r}: {err}"
            ) from None
    if col.kind == ClinicalKind.binary:
        seen = sorted({v for v in values if isinstance(v, str)})
        if len(seen) > 2:
            raise CohortError(
                f"{path}: column '{col.column}' is declared binary but has {len(seen)} values: "
                f"{seen}; declare it categorical, or fix the values"
            )
    return values


def _parse_cell(cell, col: ClinicalColumn, levels: set[str] | None):
    if col.kind == ClinicalKind.numeric:
        return PARSERS[col.parser or "number"](cell)
    text = normalise_text(cell)
    if levels is not None and text not in levels:
        raise ValueError(f"expected one of {sorted(levels)}")
    return text


def _per_patient(frame: pd.DataFrame, cfg: CohortConfig, path: Path) -> pd.DataFrame:
    """One row per patient; every per-patient column must agree across the patient's rows."""
    per_patient_cols = ["label", "split", *(c.feature_name for c in cfg.clinical)]
    column_names = {"label": cfg.label.column, "split": cfg.split_column}
    column_names.update({c.feature_name: c.column for c in cfg.clinical})
    records = {}
    for patient_id, group in frame.groupby("patient_id", sort=False):
        record = {}
        for name in per_patient_cols:
            values = group[name].dropna()
            distinct = pd.unique(values)
            if len(distinct) > 1:
                rows = ", ".join(str(r) for r in group.loc[values.index, "row"])
                raise CohortError(
                    f"{path}: patient '{patient_id}' has conflicting values in column "
                    f"'{column_names[name]}' ({', '.join(map(str, distinct))}) on rows {rows}"
                )
            record[name] = distinct[0] if len(distinct) else np.nan
        records[patient_id] = record
    patients = pd.DataFrame.from_dict(records, orient="index")
    patients.index.name = "patient_id"
    patients["label"] = patients["label"].astype(int)
    if not cfg.split_column:
        patients["split"] = None
    return patients


def _slides(frame: pd.DataFrame, cfg: CohortConfig, path: Path) -> pd.DataFrame:
    columns = ["slide_id", "patient_id"] + (["mpp"] if "mpp" in frame else [])
    if "slide_id" not in frame:
        return pd.DataFrame(columns=columns)
    slides = frame.loc[frame["slide_id"].notna(), ["row", *columns]]
    repeated = slides[slides["slide_id"].duplicated(keep=False)]
    if len(repeated):
        slide_id = repeated["slide_id"].iloc[0]
        rows = ", ".join(str(r) for r in repeated.loc[repeated["slide_id"] == slide_id, "row"])
        raise CohortError(
            f"{path}: slide id '{slide_id}' (column '{cfg.slide_column}') appears on rows {rows}; "
            "each slide must appear once"
        )
    return slides[columns].reset_index(drop=True)
