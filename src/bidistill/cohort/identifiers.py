"""Patient and slide identifiers: read exactly as written, and safe to use as file names.

No Unicode normalisation merges ``P００２６`` into ``P0026`` (two registries may use both for
different patients); spellings that differ only in NFC/NFD composition look the same to every
reader and are refused as ambiguous (finding files tolerates that difference: ``_paths``).
"""

from __future__ import annotations

import math
import unicodedata
from pathlib import Path

import pandas as pd

from bidistill.errors import CohortError

# Unicode categories no identifier should hold: control characters (tab, newline, NUL) and
# invisible format characters (zero-width space, byte-order mark, bidirectional overrides).
_INVISIBLE = ("Cc", "Cf")


def read_identifier(cell: object) -> str | None:
    """The identifier in a cell, as written but for surrounding whitespace; None when empty. A
    spreadsheet number ``12.0`` reads as ``"12"`` (Excel shows it so); text is never changed."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return None
    if isinstance(cell, float) and cell.is_integer():
        cell = int(cell)
    text = str(cell).strip()
    return text or None


def identifier_problem(identifier: str, *, names_files: bool) -> str | None:
    """Why ``identifier`` cannot be used, or None (``names_files``: a slide id names files)."""
    for ch in identifier:
        if unicodedata.category(ch) in _INVISIBLE:
            return f"it contains the invisible character U+{ord(ch):04X}"
    if names_files:
        if "/" in identifier or "\\" in identifier:
            return (
                "it contains a path separator ('/' or '\\'), which could reach outside the "
                "configured folders"
            )
        if identifier in (".", ".."):
            return "it names a folder, not a file"
    return None


def check_identifiers(
    ids: pd.Series, rows: pd.Series, *, column: str, path: Path, names_files: bool
) -> None:
    """Refuse unusable identifiers and spellings that differ only in Unicode composition."""
    present = ids.dropna()
    for value in pd.unique(present):
        problem = identifier_problem(value, names_files=names_files)
        if problem:
            row = rows[present.index[present == value][0]]
            raise CohortError(f"{path}: row {row}, column '{column}': id {value!r}: {problem}")
    distinct = pd.Series(pd.unique(present))
    composed = distinct.map(lambda v: unicodedata.normalize("NFC", v))
    clashes = composed[composed.duplicated(keep=False)]
    if len(clashes):
        spellings = distinct[composed == clashes.iloc[0]].tolist()
        where = [int(rows[present.index[present == s][0]]) for s in spellings]
        listed = " and ".join(f"{s!r} (row {r})" for s, r in zip(spellings, where))
        raise CohortError(
            f"{path}: column '{column}': ids {listed} differ only in their Unicode composition "
            "(NFC/NFD) and look the same; write them the same way"
        )
