"""Load a cohort table (CSV or XLSX, one row per slide) into a validated ``Cohort``.

Labels and clinical values are per patient: rows of one patient must agree, and a blank cell in
one row is filled by the patient's other rows. Every error names the file, and where it can, the
row (as a spreadsheet shows it), the column and the value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bidistill.cohort.identifiers import check_identifiers, read_identifier
from bidistill.cohort.labels import (
    UNLISTED,
    LabelSummary,
    classify_labels,
    drop_unlisted,
    refuse_unlisted,
    summarize_labels,
)
from bidistill.cohort.parsers import PARSERS, is_blank, normalise_text
from bidistill.config import ClinicalColumn, ClinicalKind, CohortConfig
from bidistill.errors import CohortError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}
# Spreadsheet row of the first data row: row 1 holds the header.
FIRST_ROW = 2


@dataclass
class Cohort:
    """Patients with labels, clinical values and splits, and the slides of each patient (the
    frames' columns: docs/internal-interfaces.md)."""

    patients: pd.DataFrame
    slides: pd.DataFrame
    columns: list[ClinicalColumn]
    source: Path
    label_summary: LabelSummary | None = None

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
    if suffix not in (".xlsx", ".xlsm", ".xls", ".csv", ".tsv", ".txt"):
        raise CohortError(f"{path}: expected a .csv, .tsv or .xlsx cohort table")
    try:
        if suffix in (".xlsx", ".xlsm", ".xls"):
            frame = pd.read_excel(path, sheet_name=sheet or 0, dtype=object)
        else:
            sep = "\t" if suffix == ".tsv" else None
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, sep=sep, engine="python")
    except Exception as err:  # pandas raises many types for unreadable files
        raise CohortError(f"{path}: cannot read the cohort table ({err})") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def load_cohort(
    cfg: CohortConfig, *, mpp_column: str | None = None, require_classes: bool = True
) -> Cohort:
    """Read, check and assemble the cohort that ``cfg`` describes (with ``slides.mpp_column``'s
    per-slide MPP). ``require_classes=False`` for tiling and extraction, which need no labels:
    ``check_two_classes`` is then the training stage's check."""
    path = Path(cfg.table)
    raw = read_table(path, cfg.sheet)
    _check_columns(raw, cfg, path, mpp_column)
    rows = pd.Series(raw.index.to_numpy() + FIRST_ROW, index=raw.index)
    frame = identifier_frame(raw, cfg, path, rows)
    frame["split"] = _parse_splits(raw, cfg, path, rows)
    for col in cfg.clinical:
        frame[col.feature_name] = parse_clinical(raw[col.column], col, path, rows)
    if mpp_column:
        frame["mpp"] = _map_cells(raw[mpp_column], rows, path, mpp_column, PARSERS["number"])
    frame, label_summary = _labels(frame, raw[cfg.label.column], cfg, path)
    patients, slides = per_patient(frame, cfg, path), slide_rows(frame, cfg, path)
    cohort = Cohort(patients, slides, list(cfg.clinical), path, label_summary)
    if require_classes:
        check_two_classes(cohort, cfg)
    return cohort


def check_two_classes(cohort: Cohort, cfg: CohortConfig) -> None:
    """Training needs patients of both classes."""
    labels = cohort.patients["label"]
    if labels.nunique() < 2:
        raise CohortError(
            f"{cohort.source}: label '{cfg.label.column}' has one class only "
            f"({int(labels.iloc[0]) if len(labels) else 'no rows'}); "
            f"check the label's values ({cfg.label.class_values or cfg.label.positive}) "
            "against the column's"
        )


def identifier_frame(
    raw: pd.DataFrame, cfg: CohortConfig, path: Path, rows: pd.Series
) -> pd.DataFrame:
    """``patient_id``, ``row`` and (with a slide column) ``slide_id`` of every row, read exactly
    as written and checked (``cohort.identifiers``); shared with prediction tables."""
    frame = pd.DataFrame(index=raw.index)
    frame["patient_id"] = _patient_ids(raw[cfg.patient_column], cfg.patient_column, path, rows)
    frame["row"] = rows
    if cfg.slide_column and cfg.slide_column in raw.columns:
        cells = raw[cfg.slide_column]
        frame["slide_id"] = [None if is_blank(v) else read_identifier(v) for v in cells]
        check_identifiers(
            frame["slide_id"], rows, column=cfg.slide_column, path=path, names_files=True
        )
    return frame


def _patient_ids(cells: pd.Series, column: str, path: Path, rows: pd.Series) -> pd.Series:
    ids = pd.Series([read_identifier(v) for v in cells], index=cells.index, dtype=object)
    blank = ids.isna().to_numpy()
    if blank.any():
        row = rows.iloc[blank.argmax()]
        raise CohortError(f"{path}: row {row}: blank patient id in '{column}'")
    check_identifiers(ids, rows, column=column, path=path, names_files=False)
    return ids


def declared_columns(cfg: CohortConfig, mpp_column: str | None) -> dict[str, list[str]]:
    """The table columns the config names, by the config key that names them."""
    return {
        "cohort.patient_column": [cfg.patient_column],
        "cohort.slide_column": [cfg.slide_column] if cfg.slide_column else [],
        "cohort.label.column": [cfg.label.column],
        "cohort.split_column": [cfg.split_column] if cfg.split_column else [],
        "cohort.clinical": [c.column for c in cfg.clinical],
        "slides.mpp_column": [mpp_column] if mpp_column else [],
    }


def _check_columns(raw: pd.DataFrame, cfg: CohortConfig, path: Path, mpp_column: str | None):
    for key, names in declared_columns(cfg, mpp_column).items():
        for name in names:
            if name not in raw.columns:
                raise CohortError(
                    f"{path}: column '{name}' (declared in {key}) not found; the table has "
                    f"columns: {', '.join(map(repr, raw.columns))}"
                )


def _map_cells(
    cells: pd.Series, rows: pd.Series, path: Path, column: str, parse: Callable[[Any], Any]
) -> list:
    """``parse`` of every cell, each distinct cell parsed once (a registry repeats its values:
    1058 patients hold a few dozen distinct grades); a ``ValueError`` names file, row, column."""
    parsed: dict[tuple[type, Any], Any] = {}
    values = []
    for row, cell in zip(rows, cells):
        key = (type(cell), cell)  # by type too: 1, 1.0 and True are equal as dict keys
        try:
            value = parsed[key]
        except KeyError:
            try:
                value = parsed[key] = parse(cell)
            except ValueError as err:
                raise CohortError(
                    f"{path}: row {row}, column '{column}': cannot read {cell!r}: {err}"
                ) from None
        values.append(value)
    return values


# --- labels (kept apart: a cohort of new patients to predict has none) -------------------------


def _labels(
    frame: pd.DataFrame, cells: pd.Series, cfg: CohortConfig, path: Path
) -> tuple[pd.DataFrame, LabelSummary]:
    """Add each row's label code, merge it per patient and leave out blank (and, with
    ``unlisted: drop``, unlisted) labels; returns the labelled rows and the label summary."""
    frame = frame.assign(label=classify_labels(cells, cfg.label, path))
    refuse_unlisted(frame, cells, cfg.label, path)
    frame = _fill_patient_labels(frame, cfg, path)
    names = cfg.label.class_names if cfg.label.classes else None
    summary = summarize_labels(frame, cells, cfg.label.column, names)
    frame, summary.dropped = drop_unlisted(frame, cells)
    blank = frame["label"].isna()
    summary.blank_patients = int(frame.loc[blank, "patient_id"].nunique())
    log.debug("%s: %s", path, summary.format())  # the caller shows it (pipeline, train)
    return frame[~blank], summary


def _fill_patient_labels(frame: pd.DataFrame, cfg: CohortConfig, path: Path) -> pd.DataFrame:
    """Fill a blank label cell from the patient's other rows (a merged cell in a spreadsheet
    leaves every row but the first blank), so that no slide of a labelled patient is lost; a
    patient whose rows are partly outside the task's classes is an error."""
    patient = frame["patient_id"]
    first = frame.groupby("patient_id", sort=False)["label"].transform("first")
    filled = frame["label"].fillna(first)  # only blanks change: conflicts stay for the check
    unlisted = (filled == UNLISTED).groupby(patient).transform("sum")
    mixed = (unlisted > 0) & (unlisted < patient.groupby(patient).transform("size"))
    if mixed.any():
        name = patient[mixed].iloc[0]
        rows = ", ".join(str(r) for r in frame.loc[patient == name, "row"])
        raise CohortError(
            f"{path}: patient '{name}' has conflicting values in column "
            f"'{cfg.label.column}' on rows {rows}: some are outside label.positive/negative"
        )
    return frame.assign(label=filled)


# --- splits and clinical values -----------------------------------------------------------------


def _parse_splits(raw: pd.DataFrame, cfg: CohortConfig, path: Path, rows: pd.Series) -> list:
    if not cfg.split_column:
        return [None] * len(raw)

    def parse(cell: Any) -> str:
        value = normalise_text(cell).casefold() if not is_blank(cell) else ""
        value = _SPLIT_ALIASES.get(value, value)
        if value not in SPLITS:
            raise ValueError(f"split {cell!r} is not one of {', '.join(SPLITS)}")
        return value

    return _map_cells(raw[cfg.split_column], rows, path, cfg.split_column, parse)


def parse_clinical(cells: pd.Series, col: ClinicalColumn, path: Path, rows: pd.Series) -> list:
    levels = {normalise_text(c) for c in col.categories} if col.categories else None

    def parse(cell: Any) -> Any:
        if is_blank(cell):
            return np.nan
        if col.kind == ClinicalKind.numeric:
            return PARSERS[col.parser or "number"](cell)
        text = normalise_text(cell)
        if levels is not None and text not in levels:
            raise ValueError(f"expected one of {sorted(levels)}")
        return text

    values = _map_cells(cells, rows, path, col.column, parse)
    if col.kind == ClinicalKind.binary:
        seen = sorted({v for v in values if isinstance(v, str)})
        if len(seen) > 2:
            raise CohortError(
                f"{path}: column '{col.column}' is declared binary but has {len(seen)} values: "
                f"{seen}; declare it categorical, or fix the values"
            )
    return values


def per_patient(frame: pd.DataFrame, cfg: CohortConfig, path: Path) -> pd.DataFrame:
    """One row per patient; ``label``, ``split`` and the clinical features must agree across
    the patient's rows. One groupby: a loop per patient made a 1058-patient table take seconds."""
    columns = [c for c in ("label", "split") if c in frame]
    columns += [c.feature_name for c in cfg.clinical]
    grouped = frame.groupby("patient_id", sort=False)
    conflicts = grouped[columns].nunique(dropna=True).gt(1)
    if conflicts.to_numpy().any():
        _raise_conflict(frame, conflicts, cfg, path)
    patients = grouped[columns].first()  # the first non-blank value of each column
    patients.index = patients.index.astype(str)
    patients.index.name = "patient_id"
    if "label" in patients:
        patients["label"] = patients["label"].astype(int)
    if "split" in patients and not cfg.split_column:
        patients["split"] = None
    return patients


def _raise_conflict(
    frame: pd.DataFrame, conflicts: pd.DataFrame, cfg: CohortConfig, path: Path
) -> None:
    names = {"label": cfg.label.column, "split": cfg.split_column}
    names.update({c.feature_name: c.column for c in cfg.clinical})
    patient = conflicts.any(axis=1).idxmax()  # the first in table order
    column = conflicts.loc[patient].idxmax()
    values = frame.loc[frame["patient_id"] == patient, [column, "row"]].dropna(subset=[column])
    distinct = pd.unique(values[column])
    shown = [str(int(v)) if column == "label" else str(v) for v in distinct]
    raise CohortError(
        f"{path}: patient '{patient}' has conflicting values in column '{names[column]}' "
        f"({', '.join(shown)}) on rows {', '.join(str(r) for r in values['row'])}"
    )


def slide_rows(frame: pd.DataFrame, cfg: CohortConfig, path: Path) -> pd.DataFrame:
    """``slide_id``, ``patient_id`` (and ``mpp``) per slide; a slide id may appear once."""
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
