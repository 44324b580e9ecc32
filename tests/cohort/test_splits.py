"""Splits: table, holdout and k-fold; patient-level, stratified, written and reused."""

from __future__ import annotations

import json

import pytest

from bidistill.cohort import load_cohort, make_splits, resolve_splits
from bidistill.config import SplitConfig, load_config
from bidistill.errors import CohortError


@pytest.fixture
def cohort(synth_cohort):
    return load_cohort(load_config(synth_cohort).cohort)


def test_table_split_is_used_when_present(cohort):
    splits = make_splits(cohort, SplitConfig())
    assert splits.mode == "table"
    table = cohort.patients["split"]
    assert set(splits.test) == set(table[table == "test"].index)
    assert set(splits.folds[0].val) == set(table[table == "val"].index)


def test_holdout_is_stratified_and_disjoint(cohort):
    splits = make_splits(cohort, SplitConfig(mode="holdout", test_fraction=0.25, val_fraction=0.25))
    fold = splits.folds[0]
    assert not set(fold.train) & set(fold.val) and not set(fold.train) & set(splits.test)
    assert splits.patients == set(cohort.patients.index)
    rate = cohort.labels.mean()
    for members in (fold.train, fold.val, splits.test):
        assert abs(cohort.labels.loc[members].mean() - rate) < 0.1
    assert len(splits.test) == 20


def test_kfold_keeps_the_table_test_set_and_covers_train_val(cohort):
    splits = make_splits(cohort, SplitConfig(mode="kfold", folds=4))
    table_test = set(cohort.patients.index[cohort.patients["split"] == "test"])
    assert set(splits.test) == table_test and len(splits.folds) == 4
    vals = [set(f.val) for f in splits.folds]
    assert set().union(*vals) == set(cohort.patients.index) - table_test
    assert sum(len(v) for v in vals) == len(set().union(*vals))  # each patient validates once


def test_splits_json_is_written_and_reused(cohort, tmp_path):
    path = tmp_path / "splits.json"
    first = resolve_splits(cohort, SplitConfig(mode="holdout", seed=1), path)
    saved = json.loads(path.read_text())
    assert saved["mode"] == "holdout" and sorted(saved["test"]) == first.test
    # A different seed in the config does not change a run that already has its splits.
    again = resolve_splits(cohort, SplitConfig(mode="holdout", seed=2), path)
    assert again.test == first.test and again.folds[0].train == first.folds[0].train


def test_saved_splits_that_do_not_match_the_cohort_are_refused(cohort, tmp_path):
    path = tmp_path / "splits.json"
    resolve_splits(cohort, SplitConfig(mode="holdout"), path)
    smaller = load_cohort(load_config_without(cohort, "P0000"))
    with pytest.raises(CohortError, match="do not match the cohort.*delete the file"):
        resolve_splits(smaller, SplitConfig(mode="holdout"), path)


def test_empty_split_is_an_error(cohort):
    cohort.patients.loc[cohort.patients["split"] == "val", "split"] = "train"
    with pytest.raises(CohortError, match="split 'val' .* is empty"):
        make_splits(cohort, SplitConfig(mode="table"))


def test_table_mode_without_split_column_is_an_error(cohort):
    cohort.patients["split"] = None
    with pytest.raises(CohortError, match="no split column"):
        make_splits(cohort, SplitConfig(mode="table"))


def load_config_without(cohort, patient_id):
    """The cohort's config with one patient's rows removed from a copy of the table."""
    import pandas as pd

    table = pd.read_csv(cohort.source, dtype=str, keep_default_na=False)
    copy = cohort.source.parent / "smaller.csv"
    table[table["patient_id"] != patient_id].to_csv(copy, index=False)
    cfg = load_config(cohort.source.parent / "config.yaml").cohort
    cfg.table = copy
    return cfg
