"""Commented config templates written by `bidistill init`."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def template_text(*, bcnb: bool = False) -> str:
    """The commented template: generic, or for the BCNB ALN task (N0 vs N+)."""
    generic = (files(__package__) / "experiment.yaml").read_text(encoding="utf-8")
    if not bcnb:
        return generic
    from bidistill.cohort.bcnb import config_text

    # The cohort and slides sections come from the BCNB adapter (one place knows BCNB); the
    # stage sections are the generic template's, comments included.
    head = config_text(
        task="aln",
        feature_set="balnmp5",
        table="bcnb_cohort.csv",
        has_splits=True,
        wsi_dir=Path("WSIs"),
    )
    tail = generic[generic.index("\ntiling:") :]
    note = (
        "# Template for BCNB. `bidistill bcnb prepare --root BCNB_DIR --out DIR` writes the\n"
        "# cohort table this file names, and a copy of this config with your paths.\n"
    )
    return note + head + tail
