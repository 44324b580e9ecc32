"""BD's predictions table: ``prob_present`` comes from the multi-modal branch, which reads the
clinical data, and ``prob_absent`` from the single-modal one.

Every patient of this cohort has clinical data, so every prediction batch is one where all
patients have it: the batches BD predicts with one branch only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from bidistill.cohort import load_cohort, resolve_splits
from bidistill.config import MethodConfig
from bidistill.runs.rundir import RunDir
from bidistill.synthetic.features import make_feature_cohort
from bidistill.training import train_method

from .conftest import fast_config


def train_bd(config, run: Path) -> Path:
    """Train BD on the config's cohort into ``run``; returns the method's folder.

    The only place that calls the trainer: adapt it when ``train_method``'s signature changes.
    """
    cohort = load_cohort(config.cohort)
    splits = resolve_splits(cohort, config.cohort.splits, run / "splits.json")
    method_cfg = MethodConfig(name="bd")
    out = RunDir(run).method(method_cfg.key)
    train_method(config, method_cfg, out, cohort=cohort, splits=splits, progress=False)
    return out.path


@pytest.fixture(scope="module")
def predictions(tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("all-clinical")
    config_path = make_feature_cohort(
        out / "cohort", patients=80, seed=1, dim=16, instances=(20, 40), no_clinical_share=0.0
    )
    method_dir = train_bd(fast_config(config_path), out / "run")
    return pd.read_csv(method_dir / "predictions.csv")


def test_bd_predicts_patients_with_clinical_data_from_the_clinical_branch(predictions):
    assert predictions["clinical_available"].all()
    gap = (predictions["prob_present"] - predictions["prob_absent"]).abs()
    # Two branches, two aggregators and heads: no patient gets the same probability from both.
    assert (gap > 1e-6).all(), predictions[gap <= 1e-6]
    # The clinical table carries signal the slides lack: with it, BD ranks the patients better.
    labels = predictions["label"]
    with_clinical = roc_auc_score(labels, predictions["prob_present"])
    without = roc_auc_score(labels, predictions["prob_absent"])
    assert with_clinical > without + 0.05, (with_clinical, without)  # 0.86 and 0.74 today
    assert np.isfinite(predictions[["prob_present", "prob_absent"]].to_numpy()).all()
