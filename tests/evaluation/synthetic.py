"""Method predictions from known score distributions, written as the training stage writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bidistill._io import write_csv

# Separation (mean logit gap between classes) with and without clinical data, per method.
METHOD_SEPARATION = {
    "bd": (2.4, 1.6),
    "wsi-only": (1.5, 1.5),
    "fusion-zero": (2.4, 0.6),
    "clinical-only": (1.2, 0.0),
}


def method_frame(
    method: str,
    *,
    n_patients: int = 240,
    seed: int = 0,
    folds: int = 1,
    genuinely_missing: int = 6,
) -> pd.DataFrame:
    """One method's ``predictions.csv`` rows: every patient of every split (and fold)."""
    rng = np.random.default_rng(seed)  # same patients and labels for every method
    ids = np.array([f"P{i:04d}" for i in rng.permutation(n_patients)])
    labels = (rng.random(n_patients) < 0.4).astype(int)
    split = np.where(np.arange(n_patients) < n_patients * 0.25, "test", "trainval")
    available = np.ones(n_patients, bool)
    available[rng.choice(n_patients, genuinely_missing, replace=False)] = False
    present_gap, absent_gap = METHOD_SEPARATION[method]
    method_rng = np.random.default_rng([seed, sum(map(ord, method))])
    rows = []
    for fold in range(folds):
        trainval = np.flatnonzero(split == "trainval")
        val = trainval[(np.arange(len(trainval)) + fold) % max(folds, 4) == 0]
        fold_split = split.copy()
        fold_split[trainval] = "train"
        fold_split[val] = "val"
        noise = method_rng.normal(size=n_patients)
        shared = method_rng.normal(size=n_patients) * 0.5
        logit_present = present_gap * (labels - 0.4) + noise
        logit_absent = absent_gap * (labels - 0.4) + noise * 0.8 + shared
        logit_present = np.where(available, logit_present, logit_absent)
        rows.append(
            pd.DataFrame(
                {
                    "patient_id": ids,
                    "split": fold_split,
                    "fold": fold,
                    "label": labels,
                    "clinical_available": available,
                    "prob_present": 1 / (1 + np.exp(-logit_present)),
                    "prob_absent": 1 / (1 + np.exp(-logit_absent)),
                }
            ).sample(frac=1, random_state=fold)  # rows in no particular order
        )
    return pd.concat(rows, ignore_index=True)


def write_run(run_dir: Path, methods=tuple(METHOD_SEPARATION), **kwargs) -> Path:
    for method in methods:
        write_csv(run_dir / method / "predictions.csv", method_frame(method, **kwargs))
    return run_dir
