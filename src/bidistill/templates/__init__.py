"""Commented config templates written by `bidistill init`."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# The cohort that `bidistill init --synthetic` writes beside the template: big enough for the
# report's statistics to mean something, small enough to train five methods in about a minute.
SYNTHETIC_COHORT = {"patients": 300, "dim": 16, "instances": (10, 40)}


def template_text(*, bcnb: bool = False, synthetic: bool = False) -> str:
    """The commented template: generic, for a synthetic cohort beside it, or for BCNB's ALN task.

    The generic template's columns are those of the synthetic cohort (``bidistill init
    --synthetic``), so the two differ only in the header, the encoder name and the absent slides.
    """
    generic = (files(__package__) / "experiment.yaml").read_text(encoding="utf-8")
    if bcnb:
        return _bcnb_template(generic)
    if synthetic:
        return _synthetic_template(generic)
    return generic


def _replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:  # the template file changed under this code: a bug, not user input
        raise RuntimeError(f"template: expected one {old!r}")
    return text.replace(old, new)


def _synthetic_template(generic: str) -> str:
    # The generic header says what to fill in; this one says what is there and what it is.
    body = generic[generic.index("name: my-experiment") :]
    text = (
        "# bidistill experiment config, written by `bidistill init --synthetic` with a\n"
        "# SYNTHETIC cohort beside it (cohort.csv, features/): random feature vectors with a\n"
        "# planted signal, not histology. It runs as written. For your own cohort, change\n"
        "# cohort.table and its columns, slides and features.dir (see `bidistill init`).\n"
        "# Paths are relative to this file. Unknown keys are errors, so a typo never passes.\n"
        + body
    )
    text = _replace_once(text, "name: my-experiment", "name: synthetic-example")
    text = _replace_once(text, "  encoder: resnet50-trunc    ", "  encoder: synthetic         ")
    # No slides: the synthetic cohort starts from feature files. The section stays, commented.
    start = text.index("\nslides:\n")
    end = text.index("\ntiling:\n")
    section = text[start + 1 : end].rstrip("\n").splitlines()
    commented = "\n".join(f"# {line}" if line else "#" for line in section)
    note = "# No slides for the synthetic cohort (it starts from features/). Your own:\n"
    return text[: start + 1] + note + commented + "\n" + text[end:]


def _bcnb_template(generic: str) -> str:
    from bidistill.cohort.bcnb import config_text

    # The cohort and slides sections come from the BCNB adapter (one place knows BCNB); the
    # stage sections are the generic template's, comments included. The adapter's own header
    # ("written by bcnb prepare") is replaced by this template's.
    head = config_text(
        task="aln", feature_set="balnmp5", table="cohort.csv", has_splits=True, wsi_dir=Path("WSIs")
    )
    head = "\n".join(line for line in head.splitlines() if not line.startswith("# ")) + "\n"
    tail = generic[generic.index("\ntiling:") :]
    note = (
        "# bidistill experiment config: BCNB, axillary lymph node status (N0 vs N+), clinical\n"
        "# features age, tumour size, ER, PR, HER2 (`bidistill init --bcnb`).\n"
        "# `bidistill bcnb prepare --root BCNB_DIR --out DIR` writes DIR/cohort.csv, the table\n"
        "# this file names, and DIR/config.yaml, the same cohort section with the paths of your\n"
        "# download. Keep this file beside that cohort.csv (paths are relative to this file) and\n"
        "# point slides.dir and slides.annotations_dir at BCNB_DIR/WSIs.\n"
    )
    return note + head.lstrip("\n") + tail
