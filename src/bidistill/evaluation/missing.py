"""Simulated missing clinical data: nested, label-stratified, reproducible masks keyed by a
hash of (mask seed, patient id), and the sweep that picks each patient's probability with or
without clinical data (docs/internal-interfaces.md, "Results, comparison").
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


def patient_keys(patient_ids: Sequence[str], seed: int) -> np.ndarray:
    """``[n]`` uint64 keys, uniform and independent per (seed, patient id)."""
    keys = np.empty(len(patient_ids), dtype=np.uint64)
    for i, pid in enumerate(patient_ids):
        digest = hashlib.blake2b(f"{seed}\x00{pid}".encode(), digest_size=8).digest()
        keys[i] = int.from_bytes(digest, "little")
    return keys


def nested_masks(
    patient_ids: Sequence[str],
    labels: np.ndarray,
    clinical_available: np.ndarray,
    rates: Sequence[float],
    seeds: Sequence[int],
) -> np.ndarray:
    """``[K, R, n]`` bool: True where a patient lacks clinical data (withheld, or genuinely
    missing where ``clinical_available`` is False) at each mask seed and target rate."""
    labels = np.asarray(labels)
    available = np.asarray(clinical_available, dtype=bool)
    masks = np.zeros((len(seeds), len(rates), len(patient_ids)), dtype=bool)
    masks[:, :, ~available] = True
    for k, seed in enumerate(seeds):
        keys = patient_keys(patient_ids, seed)
        for label in np.unique(labels):
            stratum = labels == label
            genuine = int(np.sum(stratum & ~available))
            candidates = np.flatnonzero(stratum & available)
            candidates = candidates[np.argsort(keys[candidates], kind="stable")]
            for r, rate in enumerate(rates):
                target = int(np.floor(rate * stratum.sum() + 0.5))
                masks[k, r, candidates[: max(target - genuine, 0)]] = True
    return masks


@dataclass
class SplitSweep:
    """Every method's probabilities ``[S, R, n]`` (K > 2 classes: ``[S, R, n, K]``) on one
    split under every (mask seed, rate): ``prob_absent`` where ``masks`` is True, else
    ``prob_present``; patients in one order."""

    split: str
    fold: int
    patient_ids: np.ndarray  # [n] str
    labels: np.ndarray  # [n] int
    clinical_available: np.ndarray  # [n] bool
    rates: np.ndarray  # [R]
    seeds: np.ndarray  # [K]
    masks: np.ndarray  # [S, R, n] bool, True = missing
    probs: dict[str, np.ndarray]  # method -> [S, R, n] or [S, R, n, K]

    @property
    def methods(self) -> list[str]:
        return list(self.probs)

    @property
    def n_classes(self) -> int:
        first = next(iter(self.probs.values()))
        return first.shape[-1] if first.ndim == 4 else 2

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (method, rate, seed, patient) with the DESIGN columns."""
        n_seeds, n_rates, n = self.masks.shape
        rate_col = np.repeat(np.tile(self.rates, n_seeds), n)
        seed_col = np.repeat(np.repeat(self.seeds, n_rates), n)
        frames = []
        for method, probs in self.probs.items():
            frame = pd.DataFrame(
                {
                    "patient": np.tile(self.patient_ids, n_seeds * n_rates),
                    "method": method,
                    "missing_rate": rate_col,
                    "mask_seed": seed_col,
                    "clinical_present": ~self.masks.reshape(-1),
                    "label": np.tile(self.labels, n_seeds * n_rates),
                }
            )
            if probs.ndim == 3:
                frame["probability"] = probs.reshape(-1)
            else:  # one column per class code
                for k in range(probs.shape[-1]):
                    frame[f"probability_{k}"] = probs[..., k].reshape(-1)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)


def sweep_split(
    predictions: dict[str, pd.DataFrame],
    *,
    split: str,
    fold: int,
    rates: Sequence[float],
    seeds: Sequence[int],
) -> SplitSweep:
    """Apply the nested masks to every method's (validated) predictions on one split of one
    fold; ``PredictionsError`` when the methods differ in this split's patients or labels."""
    from bidistill.evaluation.inputs import PredictionsError, classes_in, present_absent

    reference: pd.DataFrame | None = None
    probs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    available: list[np.ndarray] = []
    for method, frame in predictions.items():
        rows = frame[(frame["split"] == split) & (frame["fold"] == fold)]
        rows = rows.sort_values("patient_id", kind="stable").reset_index(drop=True)
        if reference is None:
            reference = rows
        elif not rows["patient_id"].equals(reference["patient_id"]):
            raise PredictionsError(
                f"method '{method}' has other {split} patients (fold {fold}) than "
                f"'{next(iter(predictions))}': every method must use the same splits.json"
            )
        elif not rows["label"].equals(reference["label"]):
            raise PredictionsError(f"method '{method}': labels differ from the other methods")
        probs[method] = present_absent(rows, classes_in(rows))
        available.append(rows["clinical_available"].to_numpy(dtype=bool))
    if reference is None:
        raise PredictionsError("no method predictions to evaluate")
    patient_ids = reference["patient_id"].to_numpy(dtype=str)
    labels = reference["label"].to_numpy(dtype=int)
    # A patient counts as having clinical data only where every method says so.
    has_clinical = np.logical_and.reduce(available)
    masks = nested_masks(patient_ids, labels, has_clinical, rates, seeds)
    return SplitSweep(
        split=split,
        fold=fold,
        patient_ids=patient_ids,
        labels=labels,
        clinical_available=has_clinical,
        rates=np.asarray(rates, dtype=np.float64),
        seeds=np.asarray(seeds, dtype=np.int64),
        masks=masks,
        probs={m: pick(masks, present, absent) for m, (present, absent) in probs.items()},
    )


def pick(masks: np.ndarray, present: np.ndarray, absent: np.ndarray) -> np.ndarray:
    """``absent`` where ``masks`` [S, R, n] is True, else ``present`` ([n] or [n, K])."""
    return np.where(masks.reshape(masks.shape + (1,) * (present.ndim - 1)), absent, present)
