"""Small helpers for the text shown to users."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and the noun in the number it takes: ``1 patient``, ``2 patients``, ``3 patches``."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {plural or noun + ('es' if noun.endswith(('s', 'x', 'ch', 'sh')) else 's')}"


def every(n: int, noun: str) -> str:
    """``all 3 slides``, or ``the slide`` when there is one."""
    return f"the {noun}" if n == 1 else f"all {count(n, noun)}"


def verb(n: int, one: str, many: str) -> str:
    """The verb that agrees with ``n``: ``verb(1, "is", "are")`` is ``is``."""
    return one if n == 1 else many
