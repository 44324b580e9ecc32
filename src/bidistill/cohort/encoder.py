"""``ClinicalEncoder``: the clinical table as model input, a scikit-learn-style estimator.

Fitted on the training split only (statistics must never see validation or test patients) and
saved beside the model, so that prediction uses exactly the training-time encoding (the encoding
per kind: docs/internal-interfaces.md).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bidistill import __version__
from bidistill._io import write_json
from bidistill.cohort.parsers import is_blank, normalise_text
from bidistill.config import ClinicalColumn, ClinicalKind
from bidistill.errors import CohortError

DEFAULT_POSITIVE = ("1", "yes", "y", "true", "positive", "pos", "+")


@dataclass
class EncodedClinical:
    """Encoded clinical data of n patients (shapes: docs/internal-interfaces.md)."""

    values: np.ndarray
    valid: np.ndarray
    present: np.ndarray


class ClinicalEncoder:
    """Encode the declared clinical columns for the models; fit on training patients only."""

    def __init__(self, columns: list[ClinicalColumn]):
        self.columns = columns

    def fit(self, frame: pd.DataFrame) -> ClinicalEncoder:
        """Learn statistics and levels from ``frame`` (training patients, a column per feature)."""
        names = [c.feature_name for c in self.columns]
        missing = [n for n in names if n not in frame.columns]
        if missing:
            raise CohortError(f"clinical encoder: columns {missing} not in the training data")
        if len(frame) == 0:
            raise CohortError("clinical encoder: no training patients to fit on")
        self.feature_names_in_ = names
        self.stats_ = [self._fit_column(col, frame[col.feature_name]) for col in self.columns]
        self._set_layout()
        return self

    def _fit_column(self, col: ClinicalColumn, cells: pd.Series) -> dict[str, Any]:
        kind = col.kind
        if kind == ClinicalKind.numeric:
            x = pd.to_numeric(cells, errors="coerce").to_numpy(float)
            observed = x[~np.isnan(x)]
            mean = float(observed.mean()) if len(observed) else 0.0
            std = float(observed.std()) if len(observed) > 1 else 1.0
            return {"kind": kind.value, "mean": mean, "std": std if std > 1e-12 else 1.0}
        if kind == ClinicalKind.binary:
            positive = [normalise_text(v).casefold() for v in (col.positive or DEFAULT_POSITIVE)]
            x = self._binary(cells, positive)
            mean = float(np.nanmean(x)) if np.isfinite(x).any() else 0.0
            # The values training saw: any other value is unseen (a typo), not the negative one.
            seen = {normalise_text(v).casefold() for v in cells if not is_blank(v)}
            levels = sorted(seen | set(positive))
            return {"kind": kind.value, "positive": positive, "mean": mean, "levels": levels}
        if kind == ClinicalKind.ordinal:
            levels = [normalise_text(c) for c in col.categories or []]
            x = self._ordinal(cells, levels)
            mean = float(np.nanmean(x)) if np.isfinite(x).any() else 0.5
            return {"kind": kind.value, "levels": levels, "mean": mean}
        observed = sorted({normalise_text(v) for v in cells if not is_blank(v)})
        levels = [normalise_text(c) for c in col.categories] if col.categories else observed
        return {"kind": kind.value, "levels": levels}

    def _set_layout(self) -> None:
        widths = [len(s["levels"]) if s["kind"] == "categorical" else 1 for s in self.stats_]
        stops = np.cumsum(widths).tolist()
        self.feature_slices_ = [(stop - w, stop) for w, stop in zip(widths, stops)]
        self.n_values_ = int(sum(widths))
        self.n_outputs_ = self.n_values_ + len(self.stats_)

    @property
    def n_features_(self) -> int:
        self._check_fitted()
        return len(self.stats_)

    def transform(self, frame: pd.DataFrame) -> EncodedClinical:
        """Encode ``frame`` (a patient per row); a category unseen in training is missing."""
        self._check_fitted()
        unknown = [c for c in self.feature_names_in_ if c not in frame.columns]
        if unknown:
            raise CohortError(f"clinical encoder: columns {unknown} missing from the input")
        n = len(frame)
        values = np.zeros((n, self.n_outputs_), dtype=np.float32)
        valid = np.zeros((n, len(self.stats_)), dtype=bool)
        for f, (name, stats) in enumerate(zip(self.feature_names_in_, self.stats_)):
            start, stop = self.feature_slices_[f]
            encoded, observed = self._encode_column(name, stats, frame[name])
            values[:, start:stop] = encoded
            valid[:, f] = observed
        values[:, self.n_values_ :] = ~valid
        return EncodedClinical(values=values, valid=valid, present=valid.any(axis=1))

    def missing_row(self, n: int = 1) -> EncodedClinical:
        """The encoding of ``n`` patients with no clinical data at all."""
        blank = pd.DataFrame({name: [np.nan] * n for name in self.feature_names_in_})
        return self.transform(blank)

    def _encode_column(self, name: str, stats: dict, cells: pd.Series):
        kind = stats["kind"]
        if kind == "numeric":
            x = pd.to_numeric(cells, errors="coerce").to_numpy(float)
            observed = ~np.isnan(x)
            z = np.where(observed, (x - stats["mean"]) / stats["std"], 0.0)
            return z[:, None], observed
        if kind == "categorical":
            levels = {level: i for i, level in enumerate(stats["levels"])}
            text = [None if is_blank(v) else normalise_text(v) for v in cells]
            _warn_unseen(name, [t for t in text if t is not None and t not in levels])
            onehot = np.zeros((len(text), len(levels)))
            observed = np.zeros(len(text), dtype=bool)
            for i, t in enumerate(text):
                if t in levels:
                    onehot[i, levels[t]] = 1.0
                    observed[i] = True
            return onehot, observed
        if kind == "binary":
            x = self._binary(cells, stats["positive"], stats.get("levels"))
            _warn_unseen(name, [v for v, m in zip(cells, np.isnan(x)) if m and not is_blank(v)])
        else:
            x = self._ordinal(cells, stats["levels"])
        observed = ~np.isnan(x)
        return np.where(observed, x, stats["mean"])[:, None], observed

    @staticmethod
    def _binary(
        cells: pd.Series, positive: list[str], levels: list[str] | None = None
    ) -> np.ndarray:
        """1 for a positive value, 0 for another value of ``levels``, NaN for a blank or a
        value outside ``levels`` (encoders saved before ``levels`` was kept: any value is 0 or
        1)."""

        def encode(cell) -> float:
            if is_blank(cell):
                return math.nan
            text = normalise_text(cell).casefold()
            if levels is not None and text not in levels:
                return math.nan
            return float(text in positive)

        return np.array([encode(v) for v in cells], dtype=float)

    @staticmethod
    def _ordinal(cells: pd.Series, levels: list[str]) -> np.ndarray:
        index = {level: i for i, level in enumerate(levels)}
        scale = max(len(levels) - 1, 1)
        return np.array(
            [
                index.get(normalise_text(v), math.nan) / scale if not is_blank(v) else math.nan
                for v in cells
            ]
        )

    def _check_fitted(self) -> None:
        if not hasattr(self, "stats_"):
            raise RuntimeError("ClinicalEncoder is not fitted: call fit() on the training rows")

    def save(self, path: str | Path) -> None:
        self._check_fitted()
        data = {
            "bidistill_version": __version__,
            "columns": [c.model_dump(mode="json") for c in self.columns],
            "feature_names_in": self.feature_names_in_,
            "stats": self.stats_,
        }
        write_json(path, data)

    @classmethod
    def load(cls, path: str | Path) -> ClinicalEncoder:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        encoder = cls([ClinicalColumn.model_validate(c) for c in data["columns"]])
        encoder.feature_names_in_ = list(data["feature_names_in"])
        encoder.stats_ = data["stats"]
        encoder._set_layout()
        return encoder

    @property
    def output_names_(self) -> list[str]:
        """A name for every column of ``values`` (for logs and model cards)."""
        names = []
        for name, stats in zip(self.feature_names_in_, self.stats_):
            if stats["kind"] == "categorical":
                names += [f"{name}={level}" for level in stats["levels"]]
            else:
                names.append(name)
        return names + [f"{name}_missing" for name in self.feature_names_in_]


def _warn_unseen(name: str, values: list) -> None:
    unseen = sorted({normalise_text(v) for v in values})
    if unseen:
        warnings.warn(
            f"clinical feature '{name}': {unseen} not seen in training; treated as missing",
            stacklevel=4,
        )
