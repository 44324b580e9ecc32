"""Checks of a config against the disk: do the files it names exist, and which stage needs them.

``bidistill config`` prints every finding; ``bidistill run`` stops on the ones that block it
before it creates the run directory, so a config error leaves nothing half made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bidistill.config import ExperimentConfig

OK, WARN, BLOCK = "ok", "warning", "missing"


@dataclass
class Finding:
    """One checked path or column.

    Attributes:
        key: the config key, e.g. ``cohort.table``.
        status: ``ok``, ``warning`` (a stage other than ``run`` needs it) or ``missing``
            (``run`` and ``train`` cannot start).
        detail: what was found, or what is wrong and which stage it blocks.
    """

    key: str
    status: str
    detail: str

    @property
    def blocks_run(self) -> bool:
        return self.status == BLOCK


def check_config_paths(config: ExperimentConfig, *, need_features: bool = True) -> list[Finding]:
    """Check the cohort table (file and declared columns), the slide and annotation folders and
    the feature files of every slide of the table.

    Args:
        config: a loaded config (paths absolute).
        need_features: False when every method of the run is trained already, so that the
            feature files are no longer read.
    """
    findings = _check_table(config, need_features=need_features)
    findings += _check_slides(config)
    return findings


def _check_table(config: ExperimentConfig, *, need_features: bool) -> list[Finding]:
    from bidistill.cohort.table import read_table
    from bidistill.errors import CohortError

    cohort = config.cohort
    table = Path(cohort.table)
    if not table.is_file():
        return [
            Finding(
                "cohort.table",
                BLOCK,
                f"{table} not found: every stage reads the cohort table (one row per slide: "
                "patient id, slide id, label, clinical columns)",
            )
        ]
    try:
        frame = read_table(table, cohort.sheet)
    except CohortError as err:
        return [Finding("cohort.table", BLOCK, str(err))]
    findings = [Finding("cohort.table", OK, f"{table} ({len(frame)} rows)")]
    declared = {
        "cohort.patient_column": [cohort.patient_column],
        "cohort.slide_column": [cohort.slide_column] if cohort.slide_column else [],
        "cohort.label.column": [cohort.label.column],
        "cohort.split_column": [cohort.split_column] if cohort.split_column else [],
        "cohort.clinical": [c.column for c in cohort.clinical],
        "slides.mpp_column": (
            [config.slides.mpp_column] if config.slides and config.slides.mpp_column else []
        ),
    }
    absent = [(key, name) for key, names in declared.items() for name in names]
    absent = [(key, name) for key, name in absent if name not in frame.columns]
    for key, name in absent:
        findings.append(
            Finding(
                key,
                BLOCK,
                f"column '{name}' is not in {table.name} (its columns: "
                f"{', '.join(map(str, frame.columns))})",
            )
        )
    if not absent and cohort.slide_column:
        from bidistill.cohort.identifiers import identifier_problem, read_identifier

        # Ids that cannot name a file are refused with their row when the cohort loads.
        slide_ids = [read_identifier(s) for s in frame[cohort.slide_column]]
        slide_ids = [s for s in slide_ids if s and not identifier_problem(s, names_files=True)]
        if config.training.mode == "end-to-end":  # bags of tiles, no feature files (issue 13)
            findings.append(_check_tiles(config, slide_ids))
        else:
            findings.append(_check_features(config, slide_ids, need_features=need_features))
    return findings


def _check_tiles(config: ExperimentConfig, slide_ids: list[str]) -> Finding:
    """End-to-end mode: the tiling stage's coords files (`run` tiles what is missing first)."""
    from bidistill.slides.coords import coords_path

    folder = Path(config.tiling.coords_dir)
    missing = [s for s in slide_ids if not coords_path(folder, s).is_file()]
    if not missing:
        return Finding("tiling.coords_dir", OK, f"{folder} (tiles of all {len(slide_ids)} slides)")
    return Finding(
        "tiling.coords_dir",
        WARN,
        f"{len(missing)} of {len(slide_ids)} slides are not tiled yet in {folder}: end-to-end "
        "training reads their tiles (`bidistill tile`; `run` tiles them first)",
    )


def _check_features(config: ExperimentConfig, slide_ids: list[str], *, need_features: bool):
    from bidistill.features.store import feature_path

    folder = Path(config.features.dir)
    status = BLOCK if need_features else WARN
    if not folder.is_dir():
        return Finding(
            "features.dir",
            status,
            f"{folder} not found: `run` and `train` read one <slide_id>.h5 per slide there "
            "(CLAM/TRIDENT layout)",
        )
    missing = [s for s in slide_ids if not feature_path(folder, s).is_file()]
    if not missing:
        return Finding(
            "features.dir", OK, f"{folder} (a feature file for all {len(slide_ids)} slides)"
        )
    return Finding(
        "features.dir",
        status,
        f"{len(missing)} of {len(slide_ids)} slides have no feature file in {folder} "
        f"(first: {feature_path(folder, missing[0]).name}): `run` and `train` need them all",
    )


def _check_slides(config: ExperimentConfig) -> list[Finding]:
    slides = config.slides
    if slides is None:
        return []
    findings = []
    for key, folder in (
        ("slides.dir", slides.dir),
        ("slides.annotations_dir", slides.annotations_dir),
    ):
        if folder is None:
            continue
        if Path(folder).is_dir():
            findings.append(Finding(key, OK, str(folder)))
        else:
            findings.append(
                Finding(
                    key,
                    WARN,
                    f"{folder} not found: `tile` needs it (`run` and `train` start from the "
                    "feature files)",
                )
            )
    return findings
