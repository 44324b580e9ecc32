"""The inputs of the run's stages, as ``StageInputs``: cohort rows, splits, feature files,
config sections and output files."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from pydantic import BaseModel

from bidistill._io import h5_attrs
from bidistill.config import ExperimentConfig, MethodConfig
from bidistill.features.store import feature_path
from bidistill.runs.fingerprint import StageInputs

# Config sections that decide what a trained method is (with the method's own entry).
TRAINING_SECTIONS = ("cohort", "slides", "tiling", "features", "training")


# Settings that change how fast a stage runs, not what it computes: a rerun on another machine
# (more workers, a GPU) resumes the same run instead of redoing it.
RUNTIME_ONLY = {
    "tiling": ("workers", "qc"),
    "features": ("batch_size", "num_workers", "device"),
    "training": ("num_workers", "device", "in_memory"),
}


def config_sections(config: ExperimentConfig, names: Iterable[str]) -> dict[str, Any]:
    """The named sections' settings that decide results: no paths, no runtime-only ones."""
    sections = {}
    for name in names:
        values = settings(getattr(config, name))
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if k not in RUNTIME_ONLY.get(name, ())}
        sections[name] = values
    return sections


def settings(section: BaseModel | None) -> Any:
    """A config section as JSON without its paths: what the paths point to is fingerprinted by
    content (cohort rows, feature files), so a project folder that moves keeps its results."""
    if section is None:
        return None
    return section.model_dump(mode="json", exclude=_path_fields(section))


def _path_fields(model: BaseModel) -> dict[str, Any]:
    exclude: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path):
            exclude[name] = True
        elif isinstance(value, BaseModel):
            nested = _path_fields(value)
            if nested:
                exclude[name] = nested
    return exclude


def cohort_rows(cohort, patient_ids: Iterable[str]) -> dict[str, Any]:
    """Per patient: label, clinical values and slide ids, as the stage reads them (parsed, so
    reformatting a cell without changing its value changes nothing)."""
    ids = [str(p) for p in patient_ids]
    rows = cohort.patients.loc[ids, ["label", *cohort.feature_names]]
    slides = cohort.slides.groupby("patient_id")["slide_id"].apply(sorted).to_dict()
    return {
        pid: [*(_cell(v) for v in values), slides.get(pid, [])]
        for pid, values in zip(ids, rows.itertuples(index=False))
    }


def _cell(value: Any) -> Any:
    if isinstance(value, float | np.floating) and np.isnan(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


class FeatureIdentities:
    """Identity of each feature file, read once per run from the file headers (name, size,
    mtime, shapes, attributes), never from the features themselves."""

    def __init__(self, features_dir: str | Path):
        self.features_dir = Path(features_dir)
        self._cache: dict[str, Any] = {}

    def of(self, slide_ids: list[str]) -> dict[str, Any]:
        for slide_id in slide_ids:
            if slide_id not in self._cache:
                self._cache[slide_id] = _file_identity(feature_path(self.features_dir, slide_id))
        return {s: self._cache[s] for s in slide_ids}


def _file_identity(path: Path) -> Any:
    try:
        stat = path.stat()
    except OSError:
        return "missing"
    identity: dict[str, Any] = {"name": path.name, "size": stat.st_size, "mtime": stat.st_mtime_ns}
    try:
        with h5py.File(path, "r") as h5:
            identity["attrs"] = h5_attrs(h5)
            for name in ("features", "coords"):
                if name in h5:
                    data = h5[name]
                    identity[name] = [list(data.shape), str(data.dtype), h5_attrs(data)]
    except (OSError, KeyError, TypeError) as err:
        identity["unreadable"] = str(err)
    return identity


def file_digest(path: Path) -> str:
    """Content digest of a small output file (a method's predictions)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:20]
    except OSError:
        return "missing"


def method_inputs(
    config: ExperimentConfig,
    method: MethodConfig,
    cohort,
    split_ids: dict[str, list[str]],
    features: FeatureIdentities,
) -> StageInputs:
    """What training one method on one fold consumes."""
    from bidistill.models.registry import fingerprinted_options

    patients = [p for ids in split_ids.values() for p in ids]
    slides = cohort.slides.loc[cohort.slides["patient_id"].isin(patients), "slide_id"]
    inputs = StageInputs()
    inputs.add(
        "config",
        {**config_sections(config, TRAINING_SECTIONS), "method": method.model_dump(mode="json")},
        says="the config",
    )
    options = fingerprinted_options(method.name, method.options)  # a changed default retrains
    inputs.add("options", options, says="its options (defaults included)")
    inputs.add("splits", {k: sorted(v) for k, v in split_ids.items()}, says="the splits")
    inputs.add_items("cohort", cohort_rows(cohort, patients), says="cohort rows", unit="patient(s)")
    if not len(slides) or not reads_slides(method):
        return inputs
    if config.training.on_tiles:  # bags of tiles: what was tiled decides the bags
        name, says, identities = "tiles", "tile files", tile_identities(config, sorted(slides))
    else:
        name, says, identities = "features", "feature files", features.of(sorted(slides))
    return inputs.add_items(name, identities, says=says, unit="slide(s)")


def tile_identities(config: ExperimentConfig, slide_ids: Iterable[str]) -> dict[str, Any]:
    """Identity of each slide's coords file (as ``FeatureIdentities`` for feature files)."""
    from bidistill.slides.coords import coords_path

    return {s: _file_identity(coords_path(config.tiling.coords_dir, s)) for s in slide_ids}


def reads_slides(method: MethodConfig) -> bool:
    """Whether a method holds a MIL aggregator (built on toy dimensions), so that a changed
    feature file retrains it; a clinical-only model is not retrained."""
    from bidistill.models import create_method

    try:
        model = create_method(
            method.name,
            in_dim=4,
            clinical_dim=2,
            n_clinical_features=1,
            feature_slices=((0, 1),),
            **method.options,
        )
    except Exception:  # noqa: BLE001 - unknown here means "assume it reads the slides"
        return True
    return any(type(m).__module__ == "bidistill.models.aggregators" for m in model.modules())
