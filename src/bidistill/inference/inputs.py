"""New patients' inputs: feature files found in folders or lists, matched to a table's patients.

Without a table each feature file is one patient (its slide id is the patient id) without
clinical data. With a table, the patients and their slides come from the table, and every slide
must have a feature file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from bidistill._io import is_temp_file
from bidistill._text import count
from bidistill.cohort import ClinicalEncoder
from bidistill.cohort.prediction import PredictionCohort
from bidistill.errors import CohortError, FeatureFileError
from bidistill.features.hygiene import checked_shape, scan_values

FeaturesArg = str | Path | Sequence[str | Path] | None


@dataclass
class PatientInput:
    patient_id: str
    slide_ids: list[str]
    paths: list[Path]  # one .h5 per slide (features or tiles), in the order of slide_ids
    slide_files: list[Path] = field(default_factory=list)  # the slides, for a run on tiles


def patient_inputs(
    files: dict[str, Path] | None,
    cohort: PredictionCohort | None,
    wanted: Sequence[str] | None,
    *,
    needs_bags: bool,
) -> list[PatientInput]:
    """The patients to predict (only ``wanted``, in that order), each with its slides' feature
    files; without ``cohort`` every file is a patient. With ``needs_bags`` every patient needs
    a feature file for each of its slides."""
    if cohort is None:
        if files is None:
            raise FeatureFileError("no features given: pass a folder or files of .h5 features")
        inputs = [PatientInput(s, [s], [p]) for s, p in files.items()]
    else:
        slides_of = cohort.slides_of()
        inputs, absent = [], []
        for patient_id in cohort.patients.index:
            slide_ids = slides_of.get(patient_id, [])
            absent += [s for s in slide_ids if files is None or s not in files]
            paths = [files[s] for s in slide_ids if files is not None and s in files]
            inputs.append(PatientInput(patient_id, slide_ids, paths))
        if needs_bags and absent:
            _refuse_missing_features(files, absent, cohort.source)
    if wanted is not None:
        by_id = {p.patient_id: p for p in inputs}
        unknown = [str(w) for w in wanted if str(w) not in by_id]
        if unknown:
            raise CohortError(
                f"patients {unknown[:5]} not found among the {count(len(by_id), 'patient')} given "
                f"(e.g. {', '.join(list(by_id)[:3])})"
            )
        inputs = [by_id[str(w)] for w in wanted]
    empty = [p.patient_id for p in inputs if not p.paths]
    if needs_bags and empty:
        raise CohortError(
            f"patients {empty[:5]} have no slide in the table, and the method predicts from slides"
        )
    return inputs


def feature_files(features: FeaturesArg) -> dict[str, Path] | None:
    """slide id → .h5 file, from folders and files (skipping what a killed write left); one
    slide id with two different files is refused, since which one holds it cannot be guessed."""
    if features is None:
        return None
    items = [features] if isinstance(features, str | Path) else list(features)
    files: dict[str, Path] = {}
    for item in map(Path, items):
        if item.is_dir():
            found = [p for p in sorted(item.glob("*.h5")) if not is_temp_file(p)]
        elif item.is_file():
            found = [item]
        else:
            raise FeatureFileError(f"{item}: no such feature file or folder")
        for path in found:
            _add_feature_file(files, path)
    if not files:
        raise FeatureFileError(f"{', '.join(map(str, items))}: no .h5 feature files")
    return files


def _add_feature_file(files: dict[str, Path], path: Path) -> None:
    slide_id = path.stem
    known = files.setdefault(slide_id, path)
    if known != path and known.resolve() != path.resolve():
        raise FeatureFileError(
            f"slide '{slide_id}' has two feature files, {known} and {path}: give only the one "
            "that holds this slide (--features)"
        )


def check_feature_values(path: Path) -> None:
    """Refuse a feature file without tiles, or with NaN or infinite values, before any patient
    is predicted (the values are read a block at a time)."""
    try:
        with h5py.File(path, "r") as h5:
            dataset = h5["features"]
            if len(dataset.shape) in (2, 3) and dataset.shape[-2] == 0:
                raise FeatureFileError(
                    f"{path}: no tiles (0 x {dataset.shape[-1]} features): nothing of this slide "
                    "was kept when it was tiled (a blank slide, or no tissue found), so there is "
                    "nothing to predict from; remove the slide (or its patient's rows of the "
                    "table) and predict again"
                )
            checked_shape(path, dataset)
            scan_values(path, dataset)
    except (OSError, KeyError) as err:
        raise FeatureFileError(f"{path}: not a readable feature file ({err})") from err


def _refuse_missing_features(files: dict[str, Path] | None, absent: list[str], table: Path):
    if files is None:
        raise FeatureFileError(f"{table}: lists slides, but no features were given (--features)")
    more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
    folders = sorted({str(p.parent) for p in files.values()})
    raise FeatureFileError(
        f"no feature file for slides {absent[:5]}{more} of {table} (looked in "
        f"{', '.join(folders)} for <slide_id>.h5)"
    )


def clinical_frame(
    cohort: PredictionCohort | None, patient_ids: list[str], encoder: ClinicalEncoder
) -> pd.DataFrame:
    names = list(encoder.feature_names_in_)
    if cohort is None:
        return pd.DataFrame(np.nan, index=pd.Index(patient_ids, name="patient_id"), columns=names)
    return cohort.patients.loc[patient_ids, names]
