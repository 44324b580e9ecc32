"""Simulated missing clinical data: nested, label-stratified, reproducible masks, and the sweep.

A mask withholds a patient's whole clinical record (the modality), never single values. At rate
``r`` the share of patients without clinical data in each label stratum is ``r`` (rounded), and
it can never be less than the share that is genuinely missing in the table: those patients are
missing at every rate, and the masks add patients that do have clinical data until the stratum
reaches its target.

Which patients are added first is decided by a per-patient key, a hash of (mask seed, patient
id): within a stratum the patients with the lowest keys are masked. So the masks are

- nested: a patient masked at a rate is masked at every higher rate (the count only grows);
- reproducible: they depend on the ids and the seed only, not on the row order, the machine or
  the other patients of the table;
- paired: every method sees the same masks, so methods can be compared patient by patient.

The sweep needs no model: every method's ``predictions.csv`` holds the probability with the
patient's clinical data (``prob_present``) and without it (``prob_absent``), and a mask picks
one of the two per patient.
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
    """Which patients lack clinical data at each (mask seed, rate).

    Args:
        patient_ids: ``[n]`` patient ids.
        labels: ``[n]`` 0/1; the masks are stratified by label.
        clinical_available: ``[n]`` bool, False where the table has no clinical value at all.
        rates: ``[R]`` target shares of patients without clinical data, in [0, 1].
        seeds: ``[K]`` mask seeds.

    Returns:
        ``[K, R, n]`` bool, True = clinical data withheld (or genuinely missing).
    """
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
    """The probabilities of every method on one split under every (mask seed, rate).

    ``probs[method]`` is ``[K, R, n]``: ``prob_absent`` where ``masks`` is True, else
    ``prob_present``. Patients are in ``patient_ids`` order for every method.
    """

    split: str
    fold: int
    patient_ids: np.ndarray  # [n] str
    labels: np.ndarray  # [n] int
    clinical_available: np.ndarray  # [n] bool
    rates: np.ndarray  # [R]
    seeds: np.ndarray  # [K]
    masks: np.ndarray  # [K, R, n] bool, True = missing
    probs: dict[str, np.ndarray]  # method -> [K, R, n]

    @property
    def methods(self) -> list[str]:
        return list(self.probs)

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (method, rate, seed, patient) with the DESIGN columns."""
        n_seeds, n_rates, n = self.masks.shape
        rate_col = np.repeat(np.tile(self.rates, n_seeds), n)
        seed_col = np.repeat(np.repeat(self.seeds, n_rates), n)
        frames = [
            pd.DataFrame(
                {
                    "patient": np.tile(self.patient_ids, n_seeds * n_rates),
                    "method": method,
                    "missing_rate": rate_col,
                    "mask_seed": seed_col,
                    "clinical_present": ~self.masks.reshape(-1),
                    "label": np.tile(self.labels, n_seeds * n_rates),
                    "probability": probs.reshape(-1),
                }
            )
            for method, probs in self.probs.items()
        ]
        return pd.concat(frames, ignore_index=True)


def sweep_split(
    predictions: dict[str, pd.DataFrame],
    *,
    split: str,
    fold: int,
    rates: Sequence[float],
    seeds: Sequence[int],
) -> SplitSweep:
    """Apply the nested masks to every method's predictions on one split of one fold.

    Args:
        predictions: method -> that method's ``predictions.csv`` (already validated).
        split: ``"test"`` or ``"val"``.
        fold: the fold whose rows to use.
        rates, seeds: the sweep grid.

    Raises:
        PredictionsError: the methods do not cover the same patients of this split, or a label
            differs between methods.
    """
    from bidistill.evaluation.inputs import PredictionsError

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
        probs[method] = (rows["prob_present"].to_numpy(), rows["prob_absent"].to_numpy())
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
        probs={m: np.where(masks, absent, present) for m, (present, absent) in probs.items()},
    )
