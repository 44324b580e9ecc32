"""Experiment protocols shipped with bidistill (``bcnb-paper.yaml``: the BCNB and BD papers')."""

from __future__ import annotations

from importlib.resources import files


def protocol_text(name: str) -> str:
    """The text of a shipped protocol file, e.g. ``bcnb-paper`` (comments kept)."""
    return (files(__package__) / f"{name}.yaml").read_text(encoding="utf-8")
