"""File names made from identifiers: kept inside their folder, found whatever the Unicode form.

A slide id becomes ``<folder>/<slide_id><suffix>``. The name must stay inside the folder (an id
such as ``../elsewhere/S0026`` or an absolute path is refused), and a file saved under another
Unicode composition of the same name (macOS writes NFD, most tools NFC) is still found.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from bidistill.errors import BidistillError


class PathOutsideFolderError(BidistillError, ValueError):
    """An identifier that would name a file outside its configured folder."""


def contained_path(folder: str | Path, name: str, suffix: str = "") -> Path:
    """``folder / (name + suffix)``, refused when ``name`` is absolute or climbs out with ``..``
    (on the names only: symbolic links inside the folder are the user's choice)."""
    folder = Path(folder)
    candidate = folder / f"{name}{suffix}"
    inside = os.path.normpath(folder.absolute())
    resolved = os.path.normpath(candidate.absolute())
    if Path(name).is_absolute() or os.path.commonpath([inside, resolved]) != inside:
        raise PathOutsideFolderError(
            f"id {name!r} would name {resolved}, outside the configured folder {inside}; "
            "ids must be plain names"
        )
    return candidate


def find_named(folder: str | Path, name: str, suffix: str = "") -> Path:
    """The existing file for ``name`` in ``folder``, trying its NFC and NFD spellings; the
    exact path when none exists (so a "not found" message names what was expected)."""
    exact = contained_path(folder, name, suffix)
    if exact.exists():
        return exact
    for form in ("NFC", "NFD"):
        other = unicodedata.normalize(form, name)
        if other != name:
            candidate = contained_path(folder, other, suffix)
            if candidate.exists():
                return candidate
    return exact


def lookup_named(mapping: dict[str, Path], name: str) -> Path | None:
    """``mapping[name]``, else the entry of its NFC or NFD spelling (file indexes by stem)."""
    for key in (name, unicodedata.normalize("NFC", name), unicodedata.normalize("NFD", name)):
        if key in mapping:
            return mapping[key]
    return None
