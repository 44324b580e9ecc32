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
    """Class code per cell: 0..K-1 (binary: 1 positive, 0 negative), NaN (blank) or
    ``UNLISTED``."""
    listed = cfg.class_values
    if listed is None:  # binary, 0 is every value that is not positive
        positive = {label_key(v) for v in cfg.positive or []} - {None}
        codes = [np.nan if k is None else float(k in positive) for k in map(label_key, cells)]
        return np.array(codes, dtype=float)
    code_of: dict[str, int] = {}
    for code, values in enumerate(listed):
        for key in {label_key(v) for v in values} - {None}:
            if key in code_of:
                names = cfg.class_names
                raise CohortError(
                    f"{path}: label value {key!r} is listed for both {names[code_of[key]]!r} "
                    f"and {names[code]!r}"
                )
            code_of[key] = code
    codes = [np.nan if k is None else code_of.get(k, UNLISTED) for k in map(label_key, cells)]
    return np.array(codes, dtype=float)


@dataclass
class LabelSummary:
    """What the label column held: ``table`` has a row per distinct value (as first written)
    with its ``code`` and ``patients``; ``dropped``: unlisted value → patients left out."""

    column: str
    table: pd.DataFrame
    dropped: dict[str, int] = field(default_factory=dict)
    blank_patients: int = 0
    class_names: list[str] | None = None  # K-class labels: code k is class_names[k]

    def format(self) -> str:
        width = max([len("value")] + [len(repr(v)) for v in self.table["value"]])
        lines = [f"label '{self.column}': value → class (patients)"]
        for row in self.table.itertuples():
            meaning = _meaning(row.code, self.class_names)
            lines.append(f"  {row.value!r:<{width}} → {meaning} ({row.patients})")
        if blank := self.blank_patients:
            is_are = verb(blank, "is", "are")
            lines.append(f"  {count(blank, 'patient')} with a blank label {is_are} left out")
        if self.dropped:
            listed = ", ".join(f"{v!r} ({n})" for v, n in self.dropped.items())
            lines.append(
                f"  label.unlisted: drop: left out {count(sum(self.dropped.values()), 'patient')} "
                f"whose label is in {'no' if self.class_names else 'neither'} list: {listed}"
            )
        return "\n".join(lines)


def _meaning(code: float, class_names: list[str] | None) -> str:
    if np.isnan(code):
        return "blank: left out"
    if int(code) == UNLISTED:
        return "in no list" if class_names else "in neither list"
    if class_names:
        return f"{int(code)} ({class_names[int(code)]})"
    return {1: "1 (positive)", 0: "0 (negative)"}[int(code)]


def summarize_labels(
    frame: pd.DataFrame, cells: pd.Series, column: str, class_names: list[str] | None = None
) -> LabelSummary:
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
    descending = class_names is None  # binary: positive first; K classes: in code order
    table = table.sort_values(["code", "value"], ascending=[not descending, True], kind="stable")
    return LabelSummary(column=column, table=table.reset_index(drop=True), class_names=class_names)


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
    lists = (
        f"any of label.classes {cfg.classes}"
        if cfg.classes
        else f"neither label.positive {cfg.positive} nor label.negative {cfg.negative}"
    )
    raise CohortError(
        f"{path}: column '{cfg.column}': {len(described)} label value(s) in {lists}: "
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
