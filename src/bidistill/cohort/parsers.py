"""Value parsers for the messy cells of real clinical registries: a raw cell → a float (NaN for a
blank), after NFKC (full-width "＜5%" → "<5%"); ``ValueError`` says why (the loader adds where).
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

_NUMBER = r"[-+]?\d+(?:[.,]\d+)?"
_NUMBER_RE = re.compile(rf"^\s*({_NUMBER})\s*([a-zA-Zµ%]*)\s*$")
_PERCENT_RE = re.compile(
    rf"^(?P<cmp>[<>≤≥]=?)?\s*(?P<lo>{_NUMBER})\s*(?P<lo_pct>%?)"
    rf"(?:\s*(?:-|–|~|to)\s*(?P<hi>{_NUMBER})\s*(?P<hi_pct>%?))?$"
)

_WHOLE_FLOAT_TEXT = re.compile(r"^([-+]?\d+)\.0+$")
# Registry spellings of "not recorded" (pandas' own NA strings among them): blank, not a category.
MISSING_MARKERS = frozenset({"na", "n/a", "#n/a", "nan", "null", "none", "-", "--", "—", "?"})


def is_blank(cell: Any) -> bool:
    """True for None, NaN, empty text and the usual "not recorded" markers (NA, N/A, -, ...)."""
    if cell is None:
        return True
    if isinstance(cell, float) and math.isnan(cell):
        return True
    return isinstance(cell, str) and normalise_text(cell).casefold() in {"", *MISSING_MARKERS}


def normalise_text(cell: Any) -> str:
    """NFKC-normalised text with whitespace collapsed; whole floats lose their ``.0`` (a
    spreadsheet turns a grade of 2 into 2.0; as a category it must read "2")."""
    if isinstance(cell, float) and cell.is_integer():
        cell = int(cell)
    text = " ".join(unicodedata.normalize("NFKC", str(cell)).split())
    # A CSV written from a float column (pandas writes 1 as "1.0") must read like Excel's 1.0.
    return _WHOLE_FLOAT_TEXT.sub(r"\1", text)


def _to_float(token: str) -> float:
    # A lone comma is a decimal comma ("3,5"); registries outside the anglosphere write them.
    # With three digits after it ("1,234") it may as well separate thousands: refuse to guess.
    whole, _, fraction = token.lstrip("+-").partition(",")
    if len(fraction) == 3 and whole.strip("0"):
        raise ValueError(
            f"{token!r} is ambiguous (thousands separator or decimal comma); "
            f"write {whole}{fraction} or {whole}.{fraction}"
        )
    return float(token.replace(",", "."))


def parse_number(cell: Any) -> float:
    """A number from a cell: ``3.5``, ``"3,5"``, ``" 2.1 cm "`` → float; blank → NaN."""
    if is_blank(cell):
        return math.nan
    if isinstance(cell, (int, float)) and not isinstance(cell, bool):
        return float(cell)
    match = _NUMBER_RE.match(normalise_text(cell))
    if not match:
        raise ValueError("expected a number (e.g. 3.5 or 3,5)")
    return _to_float(match.group(1))


def parse_percent(cell: Any) -> float:
    """A percentage as a fraction in [0, 1]: ``0.3`` (a fraction), ``30`` or ``"30%"``, a range
    ``"30-40%"`` (its midpoint), a censored ``"<5%"`` or ``"＞30%"`` (the bound: nothing finer is
    known). A bare number above 1 is read as percent."""
    if is_blank(cell):
        return math.nan
    if isinstance(cell, (int, float)) and not isinstance(cell, bool):
        value, is_percent = float(cell), cell > 1
    else:
        match = _PERCENT_RE.match(normalise_text(cell).replace(" %", "%"))
        if not match:
            raise ValueError('expected a percentage such as "30%", "0.3", "30-40%" or "<5%"')
        lo = _to_float(match["lo"])
        hi = _to_float(match["hi"]) if match["hi"] else lo
        value = (lo + hi) / 2
        is_percent = bool(match["lo_pct"] or match["hi_pct"]) or max(lo, hi) > 1
    fraction = value / 100 if is_percent else value
    if not 0 <= fraction <= 1:
        raise ValueError(f"a percentage must lie between 0% and 100% (read {fraction:.0%})")
    return fraction


PARSERS = {"number": parse_number, "percent": parse_percent}
