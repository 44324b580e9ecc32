"""``load_run``: a trained run as an object that predicts for new patients and shows its attention.

    run = load_run("runs/exp1")                       # the reference method (bd) unless told
    table = run.predict("new/features", clinical="new/patients.csv")
    patients = run.attention("new/features", clinical="new/patients.csv", patients=["P7"])

New patients come as ``.h5`` feature files (one per slide, the DESIGN layout) and, optionally, a
table in the layout of the training table without labels (``cohort.prediction``). Each patient's
clinical values go through the run's fitted encoder; the method routes the patient by what is
present (BD: the multi-modal branch with clinical data, the single-modal without). Bags are
encoded in bounded memory (``models.streaming``) and attention is mapped back to each slide's
tiles. A k-fold run predicts with the mean of its fold models.

The decision threshold is the one the evaluation uses: chosen on the run's validation patients
(Youden's J unless the config fixes one), with their clinical data as recorded for patients who
have clinical data, and with it withheld for patients who have none.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bidistill.cohort import ClinicalEncoder, EncodedClinical
from bidistill.cohort.prediction import PredictionCohort, load_prediction_cohort
from bidistill.config import ExperimentConfig, load_config
from bidistill.errors import CheckpointError, CohortError, ConfigError
from bidistill.inference.identity import check_feature_identity, run_identity
from bidistill.inference.inputs import (
    FeaturesArg,
    PatientInput,
    check_feature_values,
    clinical_frame,
    feature_files,
    patient_inputs,
)
from bidistill.inference.load import PREDICTIONS, WEIGHTS, decision_thresholds, load_trained
from bidistill.inference.new_slides import Tiles, extract_new_slides, tile_new_slides
from bidistill.inference.results import PREDICTION_COLUMNS, PatientPrediction, split_by_slide
from bidistill.models import Method
from bidistill.models.streaming import DEFAULT_MEMORY_BUDGET, find_aggregators, predict_bag
from bidistill.training.data import FileBag

log = logging.getLogger(__name__)

ClinicalArg = str | Path | pd.DataFrame | None
_BRANCH_NAMES = {"aggregator_multi": "multi-modal", "aggregator_single": "single-modal"}


# --- the run ------------------------------------------------------------------------------------


@dataclass
class _FoldModel:
    method_dir: Path
    method: Method
    encoder: ClinicalEncoder
    meta: dict[str, Any]
    thresholds: dict[str, float]  # "present" / "absent"


class TrainedRun:
    """A trained method of a run directory, ready to predict (``load_run`` makes one).

    Attributes:
        run_dir: the run directory.
        method: the method's key (its folder name).
        config: the run's experiment config.
        folds: the fold models (one for a holdout run).
        device: where the models run.
    """

    def __init__(
        self,
        run_dir: Path,
        method: str,
        config: ExperimentConfig,
        folds: list[_FoldModel],
        device: torch.device,
    ):
        self.run_dir = run_dir
        self.method = method
        self.config = config
        self.folds = folds
        self.device = device
        first = folds[0]
        self.aggregators = list(find_aggregators(first.method))
        self._branch_names = _branch_names(self.aggregators, first.meta["method"])
        self.identity, self.identity_source = run_identity(first.meta)
        self.feature_dim = int(first.meta["dims"]["in_dim"])

    @property
    def branches(self) -> list[str]:
        """The method's attention branches (BD: ``multi-modal``, ``single-modal``)."""
        return list(self._branch_names.values())

    def predict(
        self,
        features: FeaturesArg = None,
        clinical: ClinicalArg = None,
        *,
        patients: Sequence[str] | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        progress: bool = False,
    ) -> pd.DataFrame:
        """Predict new patients.

        Args:
            features: a folder of ``<slide_id>.h5`` files, one file, or a list of files; or a
                ``Tiles`` of new slides, tiled and encoded with the run's settings first.
            clinical: a table (path or DataFrame) in the training table's layout, labels not
                needed. Without it, each feature file is one patient without clinical data.
            patients: predict only these patient ids.
            memory_budget: bytes for what grows with a bag (see ``models.streaming``).

        Returns:
            One row per patient: ``patient_id, method, probability, positive_class,
            threshold, decision, predicted, branch, clinical_present, clinical_missing,
            slides, tiles`` (``probability`` is of the class named in ``positive_class``).

        Raises:
            CohortError: a bad table. FeatureFileError: a missing or foreign feature file.
        """
        rows = [
            p.row(self.method)
            for p in self.iter_patients(
                features,
                clinical,
                patients=patients,
                with_attention=False,
                memory_budget=memory_budget,
                progress=progress,
            )
        ]
        return pd.DataFrame(rows, columns=PREDICTION_COLUMNS)

    def attention(
        self,
        features: FeaturesArg,
        clinical: ClinicalArg = None,
        *,
        patients: Sequence[str] | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> list[PatientPrediction]:
        """Predict and keep every branch's attention over each slide's tiles.

        Same arguments as ``predict``; each ``PatientPrediction.slides`` holds a
        ``SlideAttention`` per slide (``.frame()`` gives one row per tile).
        """
        return list(
            self.iter_patients(
                features,
                clinical,
                patients=patients,
                with_attention=True,
                memory_budget=memory_budget,
            )
        )

    def features_from_slides(self, tiles: Tiles, cohort=None) -> list[Path] | Path:
        """Tile and encode new slides with the run's tiling and encoder settings (skipping what
        is done); returns the feature files of these slides (in ``tiles.features``, which may
        hold other slides of earlier batches: they are not predicted).

        Args:
            cohort: the prediction table; its slides are the ones made ready (default: every
                slide ``tiles.slides`` names).
        """
        from bidistill.features.store import feature_path

        listed = None if cohort is None else [s for v in cohort.slides_of().values() for s in v]
        if listed is not None and not listed:
            return tiles.features  # a clinical-only table: nothing to encode
        found = tile_new_slides(self.config, tiles, listed)
        folder = extract_new_slides(self.config, found, tiles.features)
        return [feature_path(folder, slide_id) for slide_id in found]

    def iter_patients(
        self,
        features: FeaturesArg,
        clinical: ClinicalArg = None,
        *,
        patients: Sequence[str] | None = None,
        with_attention: bool = False,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        progress: bool = False,
    ) -> Iterator[PatientPrediction]:
        """Patients one at a time (so that attention is held for one patient only).

        Every input is checked before the first prediction: the table, the feature files'
        presence, identity and dimension.
        """
        cohort = self._cohort(clinical)
        if isinstance(features, Tiles):  # new slides: tiled and encoded with the run's settings
            features = self.features_from_slides(features, cohort)
        files = feature_files(features)
        inputs = patient_inputs(files, cohort, patients, needs_bags=bool(self.aggregators))
        self._check_features(inputs)
        frame = clinical_frame(cohort, [p.patient_id for p in inputs], self.folds[0].encoder)
        encoded = [fold.encoder.transform(frame) for fold in self.folds]
        # Missing as the model saw it: blank cells and categories unseen in training.
        names = np.array(self.folds[0].encoder.feature_names_in_, dtype=object)
        missing = ~encoded[0].valid
        sequence: Sequence[int] | Iterator[int] = range(len(inputs))
        if progress:
            from bidistill._progress import transient_track

            sequence = transient_track(sequence, "predicting")
        for i in sequence:
            yield self._predict_one(
                inputs[i],
                [_row(e, i) for e in encoded],
                [str(c) for c in names[missing[i]]],
                with_attention=with_attention,
                memory_budget=memory_budget,
            )

    # --- inputs ---------------------------------------------------------------------------------

    def _cohort(self, clinical: ClinicalArg) -> PredictionCohort | None:
        if clinical is None:
            return None
        slides_cfg = self.config.slides
        other = [slides_cfg.mpp_column] if slides_cfg and slides_cfg.mpp_column else []
        # Columns of the training table that were not features were ignored in training too;
        # only a column the run has never seen is refused (often a renamed clinical column).
        other += _training_table_columns(self.config)
        return load_prediction_cohort(clinical, self.config.cohort, other_columns=other)

    def _check_features(self, inputs: list[PatientInput]) -> None:
        if not self.aggregators:
            return
        for item in inputs:
            for path in item.paths:
                check_feature_identity(
                    path, self.identity, self.identity_source, dim=self.feature_dim
                )
                check_feature_values(path)

    # --- prediction -----------------------------------------------------------------------------

    def _predict_one(
        self,
        item: PatientInput,
        clinical_rows: list[EncodedClinical],
        clinical_missing: list[str],
        *,
        with_attention: bool,
        memory_budget: int,
    ) -> PatientPrediction:
        bag = FileBag(item.paths)
        present = bool(clinical_rows[0].present[0])
        outputs = []
        for fold, row in zip(self.folds, clinical_rows):
            outputs.append(
                predict_bag(
                    fold.method,
                    bag,
                    torch.from_numpy(row.values[0]),
                    torch.from_numpy(row.valid[0]),
                    bool(row.present[0]),
                    memory_budget=memory_budget,
                    device=self.device,
                )
            )
        return self._patient_prediction(
            item,
            probabilities=[o.probability for o in outputs],
            present=present,
            routed=outputs[0].routed,
            attentions=[o.attention for o in outputs] if with_attention else [],
            paths=item.paths,
            lengths=bag.lengths,
            n_tiles=bag.n_instances,
            clinical_missing=clinical_missing,
        )

    def _patient_prediction(
        self,
        item: PatientInput,
        *,
        probabilities: list[float],
        present: bool,
        routed: str | None,
        attentions: list[dict[str, np.ndarray]],
        paths: list[Path],
        lengths: list[int],
        n_tiles: int,
        clinical_missing: list[str],
    ) -> PatientPrediction:
        """One patient's result from its folds' probabilities and attention (one entry per
        fold; no attention: no slides): the fold mean, decided at the run's mean threshold for
        the patient's route, with the attention cut into the patient's slides."""
        route = "present" if present else "absent"
        probability = float(np.mean(probabilities))
        threshold = float(np.mean([f.thresholds[route] for f in self.folds]))
        decision = int(probability >= threshold)
        method_name = self.folds[0].meta["method"]
        branch = self._branch_names.get(routed, method_name) if routed else method_name
        slides = []
        if attentions and self.aggregators:
            mean_attention = {
                self._branch_names[name]: np.mean([a[name] for a in attentions], axis=0)
                for name in self.aggregators
            }
            slides = split_by_slide(
                item.slide_ids, paths, lengths, mean_attention, branch if routed else None
            )
        return PatientPrediction(
            patient_id=item.patient_id,
            probability=probability,
            positive_class=self.positive_class,
            threshold=threshold,
            decision=decision,
            predicted=self._label_name(decision),
            branch=branch,
            clinical_present=present,
            clinical_missing=clinical_missing,
            slide_ids=item.slide_ids,
            n_tiles=n_tiles,
            slides=slides,
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
        """The class the probabilities are of, as the run's config names it."""
        return self.config.cohort.label.positive_class

    def _label_name(self, decision: int) -> str:
        label = self.config.cohort.label
        return label.positive_class if decision else label.negative_class


def _training_table_columns(config: ExperimentConfig) -> list[str]:
    """The header of the run's training table, when it can still be read (else nothing)."""
    from bidistill.cohort.table import read_table

    try:
        return list(read_table(Path(config.cohort.table), config.cohort.sheet).columns)
    except CohortError:
        return []


def _row(encoded: EncodedClinical, i: int) -> EncodedClinical:
    return EncodedClinical(
        encoded.values[i : i + 1], encoded.valid[i : i + 1], encoded.present[i : i + 1]
    )


def _branch_names(aggregators: list[str], method_name: str) -> dict[str, str]:
    """Display names: BD's branches by modality, sub-models by name, else the method's name."""
    if len(aggregators) == 1:
        return {aggregators[0]: method_name}
    return {a: _BRANCH_NAMES.get(a, a.removesuffix(".aggregator")) for a in aggregators}


# --- loading ------------------------------------------------------------------------------------


def load_run(
    run_dir: str | Path,
    method: str | None = None,
    *,
    config: str | Path | None = None,
    device: str = "auto",
) -> TrainedRun:
    """Load a trained method of a run directory for prediction.

    Args:
        run_dir: what ``bidistill run`` (or ``bidistill train``) wrote.
        method: the method's folder name; default: the config's reference method (``bd``)
            when it was trained, else the first trained method of the config.
        config: the experiment YAML; default: ``<run_dir>/config.yaml`` (``bidistill run``
            writes it; pass it for a run made by ``bidistill train``).
        device: ``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda``, ...

    Raises:
        CheckpointError: no such run or method, a method trained by a newer bidistill, a
            method whose training did not finish (k-fold: on every fold of ``splits.json``),
            or a damaged checkpoint file (each named, with the command that fixes it).
        ConfigError: no config to read the table layout from.
    """
    from bidistill.devices import resolve_device

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run directory not found")
    cfg = _run_config(run_dir, config)
    trained = _trained_methods(run_dir)
    if not trained:
        raise CheckpointError(
            f"{run_dir}: no trained method (no <method>/{WEIGHTS}); train with `bidistill run`"
        )
    key = method or _default_method(cfg, trained)
    if key not in trained:
        raise CheckpointError(
            f"{run_dir}: no trained method '{key}'; trained: {', '.join(sorted(trained))}"
        )
    _check_finished(run_dir, key, trained[key], config)
    torch_device = resolve_device(device)
    folds = []
    for method_dir in trained[key]:
        model, encoder, meta = load_trained(method_dir, device=torch_device)
        folds.append(
            _FoldModel(method_dir, model, encoder, meta, decision_thresholds(method_dir, cfg))
        )
    if folds[0].meta.get("end_to_end"):  # trained on tiles: predicts from tiles (issue 13)
        from bidistill.inference.pixel_run import PixelRun

        return PixelRun(run_dir, key, cfg, folds, torch_device)
    return TrainedRun(run_dir, key, cfg, folds, torch_device)


def _run_config(run_dir: Path, config: str | Path | None) -> ExperimentConfig:
    if config is not None:
        return load_config(config)
    if (run_dir / "config.yaml").is_file():
        return load_config(run_dir / "config.yaml")
    raise ConfigError(
        f"{run_dir}: no config.yaml (a run made by `bidistill train`); give the experiment "
        "config it was trained with (--config)"
    )


def _trained_methods(run_dir: Path) -> dict[str, list[Path]]:
    """method key → its trained folders: ``<run>/<method>/`` (holdout), else
    ``<run>/folds/fold<i>/<method>/`` (k-fold: one model per fold)."""
    per_fold: dict[str, list[Path]] = {}
    folds = [p for p in run_dir.glob("folds/fold*") if p.name.removeprefix("fold").isdigit()]
    for fold_dir in sorted(folds, key=lambda p: int(p.name.removeprefix("fold"))):
        for weights in sorted(fold_dir.glob(f"*/{WEIGHTS}")):
            per_fold.setdefault(weights.parent.name, []).append(weights.parent)
    holdout = {w.parent.name: [w.parent] for w in sorted(run_dir.glob(f"*/{WEIGHTS}"))}
    return {**per_fold, **holdout}


def _check_finished(
    run_dir: Path, method: str, method_dirs: list[Path], config: str | Path | None
) -> None:
    """Refuse a method whose training stopped part way: a k-fold run predicts with the mean of
    every fold's model, so a run killed after some folds would quietly predict with fewer.
    A method folder is finished once its ``predictions.csv`` is written (training writes it
    last)."""
    expected = _fold_count(run_dir)
    done = {_fold_of(d) for d in method_dirs if (d / PREDICTIONS).is_file()}
    missing = [k for k in range(expected) if k not in done]
    if not missing:
        return
    config_path = Path(config) if config is not None else run_dir / "config.yaml"
    finish = f"bidistill run {shlex.quote(str(config_path))} --out {shlex.quote(str(run_dir))}"
    if expected == 1:
        what = f"{run_dir / method}: training did not finish (no {PREDICTIONS})"
    else:
        names = ", ".join(f"fold{k}" for k in missing)
        what = (
            f"{run_dir}: {method} is trained on {expected - len(missing)} of {expected} folds "
            f"({names} not finished), and a k-fold run predicts with the mean of all its folds"
        )
    raise CheckpointError(f"{what}; finish the run with `{finish}`")


def _fold_count(run_dir: Path) -> int:
    """The number of folds the run trains (``splits.json``: one for holdout runs)."""
    from bidistill.cohort import Splits

    path = run_dir / "splits.json"
    return len(Splits.load(path).folds) if path.is_file() else 1


def _fold_of(method_dir: Path) -> int:
    """i for ``folds/fold<i>/<method>``, 0 for a holdout ``<method>`` folder."""
    fold = method_dir.parent
    return int(fold.name.removeprefix("fold")) if fold.parent.name == "folds" else 0


def _default_method(cfg: ExperimentConfig, trained: dict[str, list[Path]]) -> str:
    reference = cfg.evaluation.reference_method
    if reference in trained:
        return reference
    for method in cfg.methods:
        if method.key in trained:
            return method.key
    return sorted(trained)[0]
