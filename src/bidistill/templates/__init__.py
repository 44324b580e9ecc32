"""Commented config templates written by `bidistill init`."""

from __future__ import annotations

from importlib.resources import files


def template_text(*, bcnb: bool = False) -> str:
    """The commented template: generic, or for the BCNB ALN task."""
    if bcnb:
        from bidistill.cohort.bcnb import bcnb_template

        return bcnb_template()
    return (files(__package__) / "experiment.yaml").read_text(encoding="utf-8")
