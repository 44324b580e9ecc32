"""What prediction returns: a row per patient and, when asked for, attention over each slide."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import pandas as pd
from scipy.stats import rankdata

from bidistill.errors import FeatureFileError
from bidistill.features.identity import read_attrs

# What a heatmap draws per tile: the branch's attention weight, or its leave-one-out effect
# (the log-odds the branch's prediction loses without the tile; models/leave_one_out.py).
HeatmapScore = Literal["attention", "leave-one-out"]
SCORE_COLUMNS: dict[str, str] = {"attention": "attention", "leave-one-out": "effect"}


@dataclass
class PatientBags:
    """What a bag source predicts for one patient, per fold model of the run."""

    probabilities: list[float | np.ndarray]  # K > 2 classes: each class's [K]
    routed: str | None  # the aggregator (module path) that predicted, None without a bag
    # per fold, aggregator path → weights (if asked; leave-one-out: each tile's effect)
    attention: list[dict[str, np.ndarray]]
    lengths: list[int]  # tiles per slide, in the order of the patient's slides
    n_tiles: int


@dataclass
class SlideAttention:
    """Attention over one slide's tiles (``score``: or each tile's leave-one-out effect)."""

    slide_id: str
    feature_file: Path
    coords: np.ndarray  # int64 [n, 2], level-0 top-left (x, y) (patch folders: index, 0)
    # branch → weights [n], this slide's part of the patient's bag (summing to 1 over all of
    # the patient's slides)
    scores: dict[str, np.ndarray]
    routed: str | None  # the branch whose weights the prediction used (None without a bag)
    attrs: dict[str, Any] = field(default_factory=dict)  # the file's attributes
    score: HeatmapScore = "attention"  # what ``scores`` hold

    @property
    def column(self) -> str:
        """The tiles table's name for the scores: ``attention`` or ``effect``."""
        return SCORE_COLUMNS[self.score]

    @property
    def branches(self) -> list[str]:
        return list(self.scores)

    def percentiles(self, branch: str | None = None) -> np.ndarray:
        """A branch's scores as within-slide percentiles in [0, 1] (ties share a rank)."""
        scores = self.scores[branch or self.routed or self.branches[0]]
        if len(scores) < 2:
            return np.ones(len(scores))
        return (rankdata(scores) - 1) / (len(scores) - 1)

    def frame(self) -> pd.DataFrame:
        """One row per tile: ``tile, x, y``, the predicting branch's ``attention`` (or
        ``effect``, by ``score``) and ``percentile`` (a fraction in [0, 1]), that ``branch``'s
        name, and with several branches ``attention_<branch>`` (``effect_<branch>``) and
        ``percentile_<branch>`` for each."""
        frame = pd.DataFrame(
            {"tile": np.arange(len(self.coords)), "x": self.coords[:, 0], "y": self.coords[:, 1]}
        )
        if not self.scores:
            return frame
        main = self.routed or self.branches[0]
        frame[self.column] = self.scores[main]
        frame["percentile"] = self.percentiles(main)
        frame["branch"] = main  # after the columns it qualifies: their positions stay
        if len(self.scores) > 1:
            for branch, scores in self.scores.items():
                frame[f"{self.column}_{branch}"] = scores
                frame[f"percentile_{branch}"] = self.percentiles(branch)
        return frame


@dataclass
class PatientPrediction:
    """One patient's prediction, with attention per slide when asked for. ``branch``: what
    predicted (BD's ``multi-modal`` or ``single-modal``, the sub-model of ``switch``/``kd``,
    else the method's name)."""

    patient_id: str
    probability: float  # of positive_class; a k-fold run's mean over its fold models
    positive_class: str  # as the run's config names it (K > 2 classes: the predicted class)
    threshold: float  # the run's validation threshold for the patient's route (K > 2: NaN)
    decision: int  # probability >= threshold (K > 2 classes: the predicted class's code)
    predicted: str  # the decision as a class of the run
    branch: str
    clinical_present: bool  # at least one clinical value
    clinical_missing: list[str]  # the run's clinical features the patient lacks
    slide_ids: list[str]
    n_tiles: int
    slides: list[SlideAttention] = field(default_factory=list)  # TrainedRun.attention only
    # K > 2 classes: class name → probability (the argmax is ``predicted``); empty if binary
    class_probabilities: dict[str, float] = field(default_factory=dict)

    def row(self, method: str) -> dict[str, Any]:
        return {
            "patient_id": self.patient_id,
            "method": method,
            "probability": self.probability,
            **{f"probability_{c}": p for c, p in self.class_probabilities.items()},
            "positive_class": self.positive_class,
            "threshold": self.threshold,
            "decision": self.decision,
            "predicted": self.predicted,
            "branch": self.branch,
            "clinical_present": self.clinical_present,
            "clinical_missing": ";".join(self.clinical_missing),
            "slides": ";".join(self.slide_ids),
            "tiles": self.n_tiles,
        }


PREDICTION_COLUMNS = list(PatientPrediction("", 0.0, "", 0.0, 0, "", "", False, [], [], 0).row(""))


def prediction_columns(class_names: list[str] | None = None) -> list[str]:
    """``predict``'s columns: ``PREDICTION_COLUMNS`` and, for K > 2 classes, each class's
    ``probability_<class>`` after ``probability`` (that of the predicted class)."""
    after = PREDICTION_COLUMNS.index("probability") + 1
    extra = [f"probability_{name}" for name in class_names or []]
    return [*PREDICTION_COLUMNS[:after], *extra, *PREDICTION_COLUMNS[after:]]


def split_by_slide(
    slide_ids: list[str],
    paths: list[Path],
    lengths: list[int],
    attention: dict[str, np.ndarray],
    routed: str | None,
    score: HeatmapScore = "attention",
) -> list[SlideAttention]:
    """A patient's attention (branch → weights over its whole bag; or effects, by ``score``)
    cut into its slides, with each slide's tile coordinates."""
    slides = []
    stops = np.cumsum(lengths)
    for slide_id, path, stop, n in zip(slide_ids, paths, stops, lengths):
        start = stop - n
        slides.append(
            SlideAttention(
                slide_id=slide_id,
                feature_file=path,
                coords=_read_coords(path, n),
                scores={b: a[start:stop] for b, a in attention.items()},
                routed=routed,
                attrs=read_attrs(path),
                score=score,
            )
        )
    return slides


def _read_coords(path: Path, n: int) -> np.ndarray:
    with h5py.File(path, "r") as h5:
        if "coords" not in h5:
            raise FeatureFileError(
                f"{path}: no 'coords' dataset, so attention cannot be placed on the slide"
            )
        coords = np.asarray(h5["coords"][()], dtype=np.int64)
    coords = coords[0] if coords.ndim == 3 else coords
    if coords.shape != (n, 2):
        raise FeatureFileError(f"{path}: 'coords' is {coords.shape}, expected ({n}, 2)")
    return coords
