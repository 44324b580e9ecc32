"""Bags from feature files: a feature run's new patients, read from ``.h5`` files (or new slides
tiled and encoded with the run's settings) and predicted in bounded memory.

Every file's identity is checked first, since a model trained on one encoder's features
outputs numbers for another's too, and they mean nothing. Only what both sides record is
compared: CLAM's files carry no attributes and load as they are."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import torch

from bidistill.cohort import EncodedClinical
from bidistill.cohort.prediction import PredictionCohort
from bidistill.config import ExperimentConfig
from bidistill.errors import FeatureFileError
from bidistill.features.identity import FeatureIdentity, read_identity
from bidistill.inference.inputs import (
    FeaturesArg,
    PatientInput,
    check_feature_values,
    feature_files,
    patient_inputs,
)
from bidistill.inference.new_slides import (
    Tiles,
    extract_new_slides,
    listed_slides,
    tile_new_slides,
)
from bidistill.inference.results import HeatmapScore, PatientBags
from bidistill.models import Method
from bidistill.models.leave_one_out import leave_one_out
from bidistill.models.streaming import find_aggregators, predict_bag
from bidistill.training.data import FileBag


class FeatureIdentityError(FeatureFileError):
    """Features from another encoder, patch size or MPP than the run was trained on."""


class FeatureSource:
    """A feature run's bags: each patient's slides' feature files, read a chunk at a time."""

    reads_tiles = False
    scores = ("attention", "leave-one-out")

    def __init__(self, config: ExperimentConfig, meta: dict[str, Any], meta_path: Path):
        self.config = config
        self.identity, self.identity_source = run_identity(meta, meta_path)
        self.dim = int(meta["dims"]["in_dim"])

    def aggregators(self, method: Method) -> list[str]:
        return list(find_aggregators(method))

    def patients(
        self,
        features: FeaturesArg | Tiles,
        cohort: PredictionCohort | None,
        wanted: Sequence[str] | None,
        *,
        needs_bags: bool,
    ) -> list[PatientInput]:
        """The patients to predict, every feature file found and checked."""
        if isinstance(features, Tiles):
            features = self._encode_new_slides(features, cohort)
        inputs = patient_inputs(feature_files(features), cohort, wanted, needs_bags=needs_bags)
        if needs_bags:
            for path in (path for item in inputs for path in item.paths):
                check_feature_identity(path, self.identity, self.identity_source, dim=self.dim)
                check_feature_values(path)
        return inputs

    def _encode_new_slides(self, tiles: Tiles, cohort: PredictionCohort | None):
        """Tile and encode new slides with the run's tiling and encoder settings (skipping what
        is done); the feature files of these slides (``tiles.features`` may hold other slides
        of earlier batches: they are not predicted)."""
        from bidistill.features.store import feature_path

        listed = listed_slides(cohort)
        if listed is not None and not listed:
            return tiles.features  # a clinical-only table: nothing to encode
        found = tile_new_slides(self.config, tiles, listed)
        folder = extract_new_slides(self.config, found, tiles.features)
        return [feature_path(folder, slide_id) for slide_id in found]

    def predictions(
        self,
        methods: Sequence[Method],
        inputs: Sequence[PatientInput],
        encoded: Sequence[EncodedClinical],
        *,
        device: torch.device,
        with_attention: bool,
        memory_budget: int,
        score: HeatmapScore = "attention",
    ) -> Iterator[PatientBags]:
        """Per patient, every fold model's prediction of its whole bag (with attention: each
        tile's ``score``)."""
        predict = leave_one_out if with_attention and score == "leave-one-out" else predict_bag
        for i, item in enumerate(inputs):
            bag = FileBag(item.paths)
            outputs = [
                predict(
                    method,
                    bag,
                    torch.from_numpy(clinical.values[i]),
                    torch.from_numpy(clinical.valid[i]),
                    bool(clinical.present[i]),
                    memory_budget=memory_budget,
                    device=device,
                )
                for method, clinical in zip(methods, encoded)
            ]
            yield PatientBags(
                probabilities=[o.probability for o in outputs],
                routed=outputs[0].routed,
                attention=[o.attention for o in outputs] if with_attention else [],
                lengths=bag.lengths,
                n_tiles=bag.n_instances,
            )


def run_identity(meta: dict[str, Any], meta_path: Path) -> tuple[FeatureIdentity, str]:
    """(what a trained method's features were, where that was read from): the identity
    recorded in its options, else its training files', else its config's encoder name."""
    recorded = meta.get("features") or {}
    identity = FeatureIdentity.from_dict(recorded.get("identity") or {})
    if identity != FeatureIdentity():
        return identity, str(meta_path)
    training_dir = Path(recorded.get("dir") or "")
    training_file = next(iter(sorted(training_dir.glob("*.h5"))), None) if recorded else None
    if training_file is not None:
        try:
            identity = read_identity(training_file)
        except FeatureFileError:
            identity = FeatureIdentity()
        if identity != FeatureIdentity():
            return identity, f"the run's training features ({training_file})"
    if recorded.get("encoder"):
        return FeatureIdentity(encoder=recorded["encoder"]), "the run's config (features.encoder)"
    return FeatureIdentity(), "nothing recorded"


def identity_problems(found: FeatureIdentity, expected: FeatureIdentity) -> list[str]:
    """Each field both identities state and disagree on, with the run's value."""
    return [
        f"{name} {value!r} (the run's: {want!r})"
        for name, (value, want) in found.disagreements(expected).items()
    ]


def check_feature_identity(
    path: str | Path, expected: FeatureIdentity, source: str, *, dim: int | None = None
) -> None:
    """Refuse a feature file whose identity or dimension differs from the run's."""
    problems = identity_problems(read_identity(path), expected)
    if dim is not None:
        with h5py.File(path, "r") as h5:
            file_dim = int(h5["features"].shape[-1])
        if file_dim != dim:
            problems.append(f"feature dimension {file_dim} (the run's: {dim})")
    if problems:
        raise FeatureIdentityError(
            f"{path}: features of another kind than the run was trained on: "
            f"{'; '.join(problems)} (from {source}). A model's output on other features means "
            "nothing: extract these slides with the run's encoder, patch size and MPP"
        )
