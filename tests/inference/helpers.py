"""Helpers for the inference tests: tables of new patients and altered feature files."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pandas as pd


def saved_predictions(run: Path, method: str, split: str = "test") -> pd.DataFrame:
    """A method's own predictions of one split, indexed by patient id."""
    saved = pd.read_csv(run / method / "predictions.csv", dtype={"patient_id": str})
    return saved[saved["split"] == split].set_index("patient_id")


def new_patients_table(cohort: Path, target: Path, *, split: str = "test", drop=()) -> Path:
    """The cohort table's rows of one split, as a table of 'new' patients without labels."""
    table = pd.read_csv(cohort / "cohort.csv", dtype=str, keep_default_na=False)
    table = table[table["split"] == split]
    table = table.drop(columns=["nodal_status", "split", "positive_nodes", *drop])
    table.to_csv(target, index=False)
    return target


def altered_copy(source: Path, target: Path, **attrs) -> Path:
    """A copy of a feature file with some attributes changed (None deletes one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    with h5py.File(target, "a") as h5:
        for key, value in attrs.items():
            if value is None:
                h5.attrs.pop(key, None)
            else:
                h5.attrs[key] = value
    return target
