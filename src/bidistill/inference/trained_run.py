"""A trained run as an object that predicts for new patients and shows its attention
(``load_run``). Where the bags come from is the run's bag source, chosen when the run is loaded
(feature files or tiles); everything else is one path. A k-fold run predicts with the mean of
its fold models, decided at the mean of their validation thresholds for the patient's route."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from bidistill.cohort import ClinicalEncoder
from bidistill.cohort.prediction import PredictionCohort, load_prediction_cohort
from bidistill.config import ExperimentConfig
from bidistill.errors import BidistillError, CohortError
from bidistill.inference.inputs import FeaturesArg, PatientInput, clinical_frame
from bidistill.inference.new_slides import Tiles
from bidistill.inference.results import (
    HeatmapScore,
    PatientBags,
    PatientPrediction,
    prediction_columns,
    split_by_slide,
)
from bidistill.models import Method
from bidistill.models.streaming import DEFAULT_MEMORY_BUDGET
from bidistill.runs.rundir import MethodDir

ClinicalArg = str | Path | pd.DataFrame | None
_BRANCH_NAMES = {"aggregator_multi": "multi-modal", "aggregator_single": "single-modal"}


class BagSource(Protocol):
    """Where a trained run's bags come from (``FeatureSource``, ``TileSource``): the method's
    attention branches as the source runs them; the patients to predict, every input found and
    checked before any prediction; per patient, in order, every fold model's prediction."""

    reads_tiles: bool
    scores: tuple[str, ...]  # the heatmap scores it computes (``HeatmapScore``)

    def aggregators(self, method: Method) -> list[str]: ...

    def patients(
        self, features, cohort: PredictionCohort | None, wanted, *, needs_bags: bool
    ) -> list[PatientInput]: ...

    def predictions(
        self,
        methods,
        inputs,
        encoded,
        *,
        device,
        with_attention: bool,
        memory_budget: int,
        score: HeatmapScore = "attention",
    ) -> Iterator[PatientBags]: ...


@dataclass
class FoldModel:
    method_dir: MethodDir
    method: Method
    encoder: ClinicalEncoder
    meta: dict[str, Any]
    thresholds: dict[str, float]  # "present" / "absent"


class TrainedRun:
    """A trained method of a run directory (``method``: its folder name), ready to predict;
    ``folds``: one model for a holdout run."""

    def __init__(
        self,
        run_dir: Path,
        method: str,
        config: ExperimentConfig,
        folds: list[FoldModel],
        device: torch.device,
        source: BagSource,
    ):
        self.run_dir = run_dir
        self.method = method
        self.config = config
        self.folds = folds
        self.device = device
        self.source = source
        first = folds[0]
        self.aggregators = source.aggregators(first.method)
        self._branch_names = _branch_names(self.aggregators, first.meta["method"])

    @property
    def end_to_end(self) -> bool:
        """The run reads tiles (``Tiles``), not feature files."""
        return self.source.reads_tiles

    @property
    def branches(self) -> list[str]:
        """The method's attention branches (BD: ``multi-modal``, ``single-modal``)."""
        return list(self._branch_names.values())

    def predict(
        self,
        features: FeaturesArg | Tiles = None,
        clinical: ClinicalArg = None,
        *,
        patients: Sequence[str] | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        progress: bool = False,
    ) -> pd.DataFrame:
        """One row per patient (``prediction_columns``).

        ``features``: a folder of ``<slide_id>.h5`` files, one file or a list of files, or a
        ``Tiles`` of new slides (what an end-to-end run needs); ``clinical``: a table in the
        training table's layout (without it each file is a patient without clinical data).
        """
        found = self.iter_patients(
            features, clinical, patients=patients, memory_budget=memory_budget, progress=progress
        )
        label = self.config.cohort.label
        columns = prediction_columns(None if label.binary else label.class_names)
        return pd.DataFrame([p.row(self.method) for p in found], columns=columns)

    def attention(
        self,
        features: FeaturesArg | Tiles,
        clinical: ClinicalArg = None,
        *,
        patients: Sequence[str] | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        score: HeatmapScore = "attention",
    ) -> list[PatientPrediction]:
        """``predict``, keeping every branch's attention (a ``SlideAttention`` per slide);
        ``score="leave-one-out"``: each tile's effect on the branch's log-odds instead (feature
        runs; ``bidistill.models.leave_one_out``)."""
        found = self.iter_patients(
            features,
            clinical,
            patients=patients,
            with_attention=True,
            memory_budget=memory_budget,
            score=score,
        )
        return list(found)

    def iter_patients(
        self,
        features: FeaturesArg | Tiles,
        clinical: ClinicalArg = None,
        *,
        patients: Sequence[str] | None = None,
        with_attention: bool = False,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        progress: bool = False,
        score: HeatmapScore = "attention",
    ) -> Iterator[PatientPrediction]:
        """Patients one at a time (so that attention is held for one patient only), every
        input checked before the first prediction."""
        if with_attention and score not in self.source.scores:
            raise BidistillError(
                f"{self.method}: a heatmap of {score} scores needs a feature run; this run "
                f"trains on tiles end to end, so it draws {' or '.join(self.source.scores)} "
                "(--score attention)"
            )
        cohort = self._cohort(clinical)
        needs_bags = bool(self.aggregators)
        inputs = self.source.patients(features, cohort, patients, needs_bags=needs_bags)
        frame = clinical_frame(cohort, [p.patient_id for p in inputs], self.folds[0].encoder)
        encoded = [fold.encoder.transform(frame) for fold in self.folds]
        # Missing as the model saw it: blank cells and categories unseen in training.
        names = np.array(self.folds[0].encoder.feature_names_in_, dtype=object)
        missing = ~encoded[0].valid
        outputs = self.source.predictions(
            [fold.method for fold in self.folds],
            inputs,
            encoded,
            device=self.device,
            with_attention=with_attention,
            memory_budget=memory_budget,
            score=score,
        )
        sequence: Sequence[int] | Iterator[int] = range(len(inputs))
        if progress:
            from bidistill._progress import transient_track

            sequence = transient_track(sequence, "predicting")
        for i, bags in zip(sequence, outputs):
            yield self._patient_prediction(
                inputs[i],
                bags,
                present=bool(encoded[0].present[i]),
                clinical_missing=[str(c) for c in names[missing[i]]],
                score=score,
            )

    def _cohort(self, clinical: ClinicalArg) -> PredictionCohort | None:
        if clinical is None:
            return None
        slides_cfg = self.config.slides
        other = [slides_cfg.mpp_column] if slides_cfg and slides_cfg.mpp_column else []
        # Columns of the training table that were not features were ignored in training too;
        # only a column the run has never seen is refused (often a renamed clinical column).
        other += _training_table_columns(self.config)
        return load_prediction_cohort(clinical, self.config.cohort, other_columns=other)

    def _patient_prediction(
        self,
        item: PatientInput,
        bags: PatientBags,
        *,
        present: bool,
        clinical_missing: list[str],
        score: HeatmapScore = "attention",
    ) -> PatientPrediction:
        route = "present" if present else "absent"
        label = self.config.cohort.label
        scores = np.mean(bags.probabilities, axis=0)  # P(label = 1), or each class's [K]
        threshold = float(np.mean([f.thresholds[route] for f in self.folds]))
        if scores.ndim:  # K classes: the class of highest probability
            decision = int(np.argmax(scores))
            probability, predicted = float(scores[decision]), label.class_names[decision]
            named = dict(zip(label.class_names, map(float, scores)))
        else:
            probability, named = float(scores), {}
            decision = int(probability >= threshold)
            predicted = label.positive_class if decision else label.negative_class
        method_name = self.folds[0].meta["method"]
        routed = bags.routed
        branch = self._branch_names.get(routed, method_name) if routed else method_name
        slides = []
        if bags.attention and self.aggregators:
            mean_attention = {
                self._branch_names[name]: np.mean([a[name] for a in bags.attention], axis=0)
                for name in self.aggregators
            }
            slides = split_by_slide(
                item.slide_ids,
                item.paths,
                bags.lengths,
                mean_attention,
                branch if routed else None,
                score=score,
            )
        return PatientPrediction(
            patient_id=item.patient_id,
            probability=probability,
            positive_class=predicted if named else self.positive_class,
            threshold=threshold,
            decision=decision,
            predicted=predicted,
            branch=branch,
            clinical_present=present,
            clinical_missing=clinical_missing,
            slide_ids=item.slide_ids,
            n_tiles=bags.n_tiles,
            slides=slides,
            class_probabilities=named,
        )

    @property
    def random_init(self) -> bool:
        """The run's patch encoder had random weights (``features.random_init``: tests and
        demos), so its predictions carry no pretrained knowledge."""
        meta = self.folds[0].meta
        recorded = (meta.get("features") or {}).get("identity") or {}  # feature runs
        backbone = (meta.get("end_to_end") or {}).get("backbone") or {}  # end-to-end runs
        return bool(
            self.config.features.random_init
            or recorded.get("random_init")
            or backbone.get("random_init")
        )

    @property
    def positive_class(self) -> str:
        return self.config.cohort.label.positive_class


def _training_table_columns(config: ExperimentConfig) -> list[str]:
    """The header of the run's training table, when it can still be read (else nothing)."""
    from bidistill.cohort.table import read_table

    try:
        return list(read_table(Path(config.cohort.table), config.cohort.sheet).columns)
    except CohortError:
        return []


def _branch_names(aggregators: list[str], method_name: str) -> dict[str, str]:
    """Display names: BD's branches by modality, sub-models by name, else the method's name."""
    if len(aggregators) == 1:
        return {aggregators[0]: method_name}
    return {a: _BRANCH_NAMES.get(a, a.removesuffix(".aggregator")) for a in aggregators}
