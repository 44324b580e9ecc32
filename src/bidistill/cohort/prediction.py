"""Tables of new patients for prediction: the training table's layout, labels optional.

Values are parsed exactly as in training. A clinical column the run never saw is refused: it would
be silently ignored, and it is often a renamed column the user expects to count. A run column that
the table lacks is missing for every patient (with a warning), as a blank cell would be.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bidistill.cohort.table import (
    FIRST_ROW,
    identifier_frame,
    parse_clinical,
    per_patient,
    read_table,
    slide_rows,
)
from bidistill.config import CohortConfig
from bidistill.errors import CohortError

log = logging.getLogger(__name__)


@dataclass
class PredictionCohort:
    """New patients: ``patients`` (a column per clinical feature, as ``Cohort.patients``), their
    ``slides`` and the run's clinical columns that the table lacks."""

    patients: pd.DataFrame
    slides: pd.DataFrame
    missing_columns: list[str]
    source: Path

    def slides_of(self) -> dict[str, list[str]]:
        """patient id → its slide ids, in table order."""
        grouped = self.slides.groupby("patient_id", sort=False)["slide_id"]
        return {str(p): list(s) for p, s in grouped}


def load_prediction_cohort(
    table: str | Path | pd.DataFrame, cfg: CohortConfig, *, other_columns: Sequence[str] = ()
) -> PredictionCohort:
    """Read a table (a file, or a DataFrame of cells) of new patients with the run's cohort
    section; ``other_columns``: further columns the run knows and prediction ignores."""
    if isinstance(table, pd.DataFrame):
        path = Path("<table>")
        raw = table.astype(object).where(table.notna(), "").astype(str)
        raw.columns = [str(c).strip() for c in raw.columns]
        raw = raw.reset_index(drop=True)
    else:
        path = Path(table)
        raw = read_table(path, cfg.sheet)
    _check_prediction_columns(raw, cfg, path, other_columns)
    rows = pd.Series(raw.index.to_numpy() + FIRST_ROW, index=raw.index)
    frame = identifier_frame(raw, cfg, path, rows)
    missing = [c.column for c in cfg.clinical if c.column not in raw.columns]
    for col in cfg.clinical:
        if col.column in raw.columns:
            frame[col.feature_name] = parse_clinical(raw[col.column], col, path, rows)
        else:
            frame[col.feature_name] = np.nan
    if missing:
        log.warning(
            "%s: no column %s: missing for every patient", path, ", ".join(map(repr, missing))
        )
    return PredictionCohort(
        patients=per_patient(frame, cfg, path),
        slides=slide_rows(frame, cfg, path),
        missing_columns=missing,
        source=path,
    )


def _check_prediction_columns(
    raw: pd.DataFrame, cfg: CohortConfig, path: Path, other_columns: Sequence[str]
) -> None:
    if cfg.patient_column not in raw.columns:
        raise CohortError(
            f"{path}: no patient id column '{cfg.patient_column}' (the run's "
            f"cohort.patient_column); the table has columns: {', '.join(map(repr, raw.columns))}"
        )
    if cfg.slide_column and cfg.slide_column not in raw.columns:
        raise CohortError(
            f"{path}: no slide id column '{cfg.slide_column}' (the run's cohort.slide_column), "
            "so no patient can be matched to a feature file"
        )
    clinical = [c.column for c in cfg.clinical]
    ids = {cfg.patient_column, cfg.slide_column, cfg.label.column, cfg.split_column}
    known = ids | {*cfg.leakage_columns, *other_columns, *clinical}
    for column in raw.columns:
        if column in known:
            continue
        hint = difflib.get_close_matches(column, clinical, n=1)
        did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
        raise CohortError(
            f"{path}: column '{column}' is not a column the run knows.{did_you_mean} "
            f"The run's clinical columns: {', '.join(clinical) or 'none'}; remove the column "
            "(or rename it to the run's name) so that nothing is silently ignored"
        )
