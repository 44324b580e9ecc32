"""Patient-level splits: the table's own, a stratified holdout, or k folds with a fixed test set.

Splits are always written to ``splits.json`` and reused on reruns, so a run is reproducible even
when the table or the code that made the split changes later.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from bidistill import __version__
from bidistill._io import write_json
from bidistill._text import count
from bidistill.cohort.table import Cohort
from bidistill.config import SplitConfig, SplitMode
from bidistill.errors import CohortError


@dataclass
class Fold:
    train: list[str]
    val: list[str]


@dataclass
class Splits:
    """Patient ids per split. Holdout and table modes have one fold; kfold has k."""

    mode: str
    seed: int
    test: list[str]
    folds: list[Fold] = field(default_factory=list)

    @property
    def patients(self) -> set[str]:
        fold = self.folds[0]
        return {*self.test, *fold.train, *fold.val}

    def save(self, path: str | Path) -> None:
        write_json(path, {"bidistill_version": __version__, **asdict(self)})

    @classmethod
    def load(cls, path: str | Path) -> Splits:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                mode=data["mode"],
                seed=int(data["seed"]),
                test=list(data["test"]),
                folds=[Fold(list(f["train"]), list(f["val"])) for f in data["folds"]],
            )
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CohortError(
                f"{path}: not a valid splits file ({err}); delete it to make new splits"
            ) from err


def make_splits(cohort: Cohort, cfg: SplitConfig) -> Splits:
    """Split the cohort's patients as ``cfg`` says (stratified by label, grouped by patient)."""
    has_table_split = cohort.patients["split"].notna().all() and len(cohort.patients)
    mode = cfg.mode
    if mode == SplitMode.auto:
        mode = SplitMode.table if has_table_split else SplitMode.holdout
    if mode == SplitMode.table and not has_table_split:
        raise CohortError(
            f"{cohort.source}: splits.mode is 'table' but the cohort has no split column "
            "(set cohort.split_column)"
        )
    ids = cohort.patients.index.to_numpy()
    labels = cohort.labels.to_numpy()
    if has_table_split and mode in (SplitMode.table, SplitMode.kfold):
        by_split = cohort.patients["split"]
        test = ids[(by_split == "test").to_numpy()]
        rest = ids[(by_split != "test").to_numpy()]
    else:
        rest, test = _stratified_cut(ids, labels, cfg.test_fraction, cfg.seed)
    rest_labels = cohort.labels.loc[rest].to_numpy()
    if mode == SplitMode.table:
        split = cohort.patients.loc[rest, "split"]
        folds = [Fold(sorted(rest[split == "train"]), sorted(rest[split == "val"]))]
    elif mode == SplitMode.kfold:
        folds = _kfold(rest, rest_labels, cfg.folds, cfg.seed, cohort.source)
    else:
        val_share = cfg.val_fraction / (1 - cfg.test_fraction)
        train, val = _stratified_cut(rest, rest_labels, val_share, cfg.seed)
        folds = [Fold(sorted(train), sorted(val))]
    splits = Splits(mode=mode.value, seed=cfg.seed, test=sorted(test), folds=folds)
    check_splits(splits, cohort)
    return splits


def _stratified_cut(ids, labels, share: float, seed: int):
    try:
        keep, cut = train_test_split(ids, test_size=share, stratify=labels, random_state=seed)
    except ValueError as err:
        what = count(len(ids), "patient")
        raise CohortError(f"cannot make a stratified split of {what}: {err}") from err
    return np.asarray(keep), np.asarray(cut)


def _kfold(ids, labels, k: int, seed: int, source: Path) -> list[Fold]:
    if np.bincount(labels, minlength=2).min() < k:
        raise CohortError(f"{source}: too few patients of the smaller class for {k} folds")
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [Fold(sorted(ids[tr]), sorted(ids[va])) for tr, va in folds.split(ids, labels)]


def check_splits(splits: Splits, cohort: Cohort) -> None:
    """Every split non-empty with both classes in train; every patient in exactly one split."""
    labels = cohort.labels
    for i, fold in enumerate(splits.folds):
        for name, members in (("train", fold.train), ("val", fold.val), ("test", splits.test)):
            if not members:
                raise CohortError(
                    f"{cohort.source}: split '{name}' (fold {i}) is empty; every split needs "
                    "patients (check the split column or the split fractions)"
                )
        if labels.loc[fold.train].nunique() < 2:
            raise CohortError(f"{cohort.source}: the training split (fold {i}) has one class")
        train, val = set(fold.train), set(fold.val)
        overlap = train & val | (train | val) & set(splits.test)
        if overlap:
            raise CohortError(f"patients in more than one split: {sorted(overlap)[:5]}")


def resolve_splits(cohort: Cohort, cfg: SplitConfig, path: str | Path) -> Splits:
    """Reuse ``path`` when it exists and covers exactly this cohort; else make and write it."""
    path = Path(path)
    if path.is_file():
        splits = Splits.load(path)
        if splits.patients != set(cohort.patients.index):
            added = set(cohort.patients.index) - splits.patients
            gone = splits.patients - set(cohort.patients.index)
            raise CohortError(
                f"{path}: the saved splits do not match the cohort "
                f"({count(len(added), 'patient')} not in "
                f"them, {len(gone)} no longer in the cohort); delete the file to make new splits"
            )
        check_splits(splits, cohort)
        return splits
    splits = make_splits(cohort, cfg)
    splits.save(path)
    return splits
