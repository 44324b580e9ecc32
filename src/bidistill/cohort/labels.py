"""The label column: which written value means which class, shown before any work is done.

Values are compared after NFKC normalisation, whitespace collapsing and case folding, so ``"n+"``
and ``"Ｎ+"`` both match ``N+``, but ``"N 0"`` does not match ``N0``. These functions know nothing
of the rest of the table, so a cohort without labels (new patients) simply does not call them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bidistill._text import count, verb
from bidistill.cohort.parsers import is_blank, normalise_text
from bidistill.config import LabelConfig
from bidistill.errors import CohortError

# Class codes of a label cell before the per-patient merge: 1, 0, NaN (blank) or UNLISTED.
UNLISTED = -1
# Values listed in an error message before "and N more".
_SHOWN = 12


def label_key(cell: object) -> str | None:
    """How a label value is compared with the lists: NFKC, whitespace collapsed, case folded."""
    return None if is_blank(cell) else normalise_text(cell).casefold()


def classify_labels(cells: pd.Series, cfg: LabelConfig, path: Path) -> np.ndarray:
    """Class code per cell: 1 (positive), 0 (negative), NaN (blank) or ``UNLISTED``."""
    positive = {label_key(v) for v in cfg.positive} - {None}
    negative = None if cfg.negative is None else {label_key(v) for v in cfg.negative} - {None}
    overlap = positive & (negative or set())
    if overlap:
        raise CohortError(f"{path}: label values {sorted(overlap)} are both positive and negative")

    def code(key: str | None) -> float:
        if key is None:
            return np.nan
        if key in positive:
            return 1
        return 0 if negative is None or key in negative else UNLISTED

    return np.array([code(label_key(cell)) for cell in cells], dtype=float)


@dataclass
class LabelSummary:
    """What the label column held: ``table`` has a row per distinct value (as first written)
    with its ``code`` and ``patients``; ``dropped``: unlisted value → patients left out."""

    column: str
    table: pd.DataFrame
    dropped: dict[str, int] = field(default_factory=dict)
    blank_patients: int = 0

    def format(self) -> str:
        width = max([len("value")] + [len(repr(v)) for v in self.table["value"]])
        lines = [f"label '{self.column}': value → class (patients)"]
        for row in self.table.itertuples():
            lines.append(f"  {row.value!r:<{width}} → {_meaning(row.code)} ({row.patients})")
        if blank := self.blank_patients:
            is_are = verb(blank, "is", "are")
            lines.append(f"  {count(blank, 'patient')} with a blank label {is_are} left out")
        if self.dropped:
            listed = ", ".join(f"{v!r} ({n})" for v, n in self.dropped.items())
            lines.append(
                f"  label.unlisted: drop: left out {count(sum(self.dropped.values()), 'patient')} "
                f"whose label is in neither list: {listed}"
            )
        return "\n".join(lines)


def _meaning(code: float) -> str:
    if np.isnan(code):
        return "blank: left out"
    return {1: "1 (positive)", 0: "0 (negative)", UNLISTED: "in neither list"}[int(code)]


def summarize_labels(frame: pd.DataFrame, cells: pd.Series, column: str) -> LabelSummary:
    """Patients per written label value (``frame``: each row's ``patient_id`` and ``label``)."""
    written = pd.DataFrame(
        {
            "patient_id": frame["patient_id"],
            "key": [label_key(c) for c in cells],
            "value": [None if is_blank(c) else normalise_text(c) for c in cells],
            "code": frame["label"],
        }
    ).dropna(subset=["key"])
    grouped = written.groupby("key", sort=False)
    table = pd.DataFrame(
        {
            "value": grouped["value"].first(),
            "code": grouped["code"].first(),
            "patients": grouped["patient_id"].nunique(),
        }
    )
    table = table.sort_values(["code", "value"], ascending=[False, True], kind="stable")
    return LabelSummary(column=column, table=table.reset_index(drop=True))


def refuse_unlisted(frame: pd.DataFrame, cells: pd.Series, cfg: LabelConfig, path: Path) -> None:
    """With ``unlisted: error`` (the default), stop on label values in neither list."""
    unlisted = (frame["label"] == UNLISTED).to_numpy()
    if cfg.unlisted == "drop" or not unlisted.any():
        return
    rows = frame.loc[unlisted, ["patient_id", "row"]].assign(
        value=[normalise_text(c) for c in cells[unlisted]]
    )
    described = [
        f"{value!r} ({count(group['patient_id'].nunique(), 'patient')}; rows {_rows(group['row'])})"
        for value, group in rows.groupby("value", sort=False)
    ]
    more = f" and {len(described) - _SHOWN} more" if len(described) > _SHOWN else ""
    raise CohortError(
        f"{path}: column '{cfg.column}': {len(described)} label value(s) in neither "
        f"label.positive {cfg.positive} nor label.negative {cfg.negative}: "
        f"{'; '.join(described[:_SHOWN])}{more}; fix the table, add the values to a list, or "
        "set label.unlisted: drop to leave these patients out"
    )


def drop_unlisted(frame: pd.DataFrame, cells: pd.Series) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows whose label is in a list, and each dropped value → patients left out."""
    unlisted = (frame["label"] == UNLISTED).to_numpy()
    if not unlisted.any():
        return frame, {}
    written = pd.Series(
        [None if is_blank(c) else normalise_text(c) for c in cells[unlisted]],
        index=frame.index[unlisted],
    )
    dropped = frame.loc[unlisted, ["patient_id"]].assign(value=written).dropna(subset=["value"])
    counts = dropped.groupby("value", sort=False)["patient_id"].nunique()
    return frame[~unlisted], {str(v): int(n) for v, n in counts.items()}


def _rows(rows: pd.Series, shown: int = 5) -> str:
    listed = ", ".join(str(r) for r in rows.iloc[:shown])
    return listed + (f", … ({len(rows)} rows)" if len(rows) > shown else "")
