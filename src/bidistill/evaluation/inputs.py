"""Reading and checking each method's predictions, the evaluation's input (columns:
docs/internal-interfaces.md, "Training → evaluation").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bidistill.errors import BidistillError
from bidistill.scores import probability_columns

PREDICTION_COLUMNS = (
    "patient_id",
    "split",
    "fold",
    "label",
    "clinical_available",
    "prob_present",
    "prob_absent",
)
KEY_COLUMNS = PREDICTION_COLUMNS[:5]
SPLITS = ("train", "val", "test")
PASSES = ("present", "absent")  # clinical data as given, withheld


class PredictionsError(BidistillError, ValueError):
    """A method's predictions file that cannot be evaluated; the message names file and row."""


def read_method_predictions(path: str | Path) -> pd.DataFrame:
    """Read and check one method's predictions, typed; ``PredictionsError`` names the file,
    row and column of a missing column, a bad value or a patient listed twice."""
    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"{path}: predictions file not found (train the method first)")
    frame = pd.read_csv(path, dtype={"patient_id": str, "split": str})
    n_classes = classes_in(frame)
    expected = [*KEY_COLUMNS, *(c for p in PASSES for c in probability_columns(p, n_classes))]
    if missing := [c for c in expected if c not in frame.columns]:
        raise PredictionsError(f"{path}: missing columns {missing}; expected {', '.join(expected)}")
    frame = frame[expected].copy()
    _check_values(path, frame, n_classes)
    frame["fold"] = frame["fold"].astype(int)
    frame["label"] = frame["label"].astype(int)
    if (dupes := frame.duplicated(["patient_id", "split", "fold"])).any():
        row = int(np.flatnonzero(dupes)[0])
        raise PredictionsError(
            f"{path}: row {row + 2}: patient '{frame.patient_id.iloc[row]}' listed twice in "
            f"split '{frame.split.iloc[row]}' of fold {frame.fold.iloc[row]}"
        )
    return frame


def classes_in(frame: pd.DataFrame) -> int:
    """K, from a predictions file's columns: 2 with ``prob_present``, else one
    ``prob_present_<k>`` column per class."""
    if "prob_present" in frame.columns:
        return 2
    k = 0
    while f"prob_present_{k}" in frame.columns:
        k += 1
    return k if k > 2 else 2  # fewer: the binary columns are the ones missing


def present_absent(rows: pd.DataFrame, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``present`` and ``absent`` probabilities of ``rows``: [n] (binary) or [n, K]."""
    present, absent = (rows[probability_columns(p, n_classes)].to_numpy() for p in PASSES)
    return (present[:, 0], absent[:, 0]) if n_classes == 2 else (present, absent)


def _check_values(path: Path, frame: pd.DataFrame, n_classes: int) -> None:
    def refuse(bad: pd.Series, column: str, expected: str) -> None:
        """``PredictionsError`` naming the first row where ``bad`` is True, if any."""
        if not bad.any():
            return
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise PredictionsError(
            f"{path}: row {row + 2}, column '{column}': expected {expected}, "
            f"got {str(frame[column].iloc[row])!r}"
        )

    refuse(~frame["split"].isin(SPLITS), "split", "one of train, val, test")
    codes = list(range(n_classes))
    for column in ("fold", "label"):
        values = pd.to_numeric(frame[column], errors="coerce")
        allowed = values.isin(codes) if column == "label" else (values >= 0) & (values % 1 == 0)
        labels = "0 or 1" if n_classes == 2 else f"a class code 0..{n_classes - 1}"
        refuse(~allowed, column, labels if column == "label" else "a fold number >= 0")
    bools = frame["clinical_available"].astype(str).str.strip().str.lower()
    known = bools.isin({"true", "false", "0", "1", "0.0", "1.0", "yes", "no"})
    refuse(~known, "clinical_available", "true or false")
    frame["clinical_available"] = bools.isin({"true", "1", "1.0", "yes"})
    for column in (c for p in PASSES for c in probability_columns(p, n_classes)):
        values = pd.to_numeric(frame[column], errors="coerce")
        refuse(~((values >= 0) & (values <= 1)), column, "a probability in [0, 1]")
        frame[column] = values.astype(np.float64)
