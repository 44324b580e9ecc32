"""The stages of an experiment in order (``STAGES``; docs/internal-interfaces.md lists them).

Each stage records what it consumed after its outputs are written, so a rerun redoes exactly the
stages whose inputs changed, says why, and keeps the others.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from bidistill._io import write_csv, write_json, write_text
from bidistill.config import ExperimentConfig, MethodConfig, dump_config
from bidistill.errors import ConfigError
from bidistill.runs.fingerprint import (
    StageInputs,
    check_stage,
    forget_stage,
    read_run_info,
    record_stage,
    write_run_info,
)
from bidistill.runs.inputs import FeatureIdentities, method_inputs
from bidistill.runs.rundir import RunDir

log = logging.getLogger(__name__)

Say = Callable[[str], None]

RUN_HINT = (
    "`bidistill tile CONFIG --skip-errors` and `bidistill extract CONFIG --skip-errors` go on past "
    "failing slides; then remove those slides from the cohort table"
)
RANDOM_FEATURES_WARNING = (
    "the features come from a RANDOMLY INITIALISED encoder (features.random_init): they carry "
    "no pretrained knowledge, so these results say nothing about real performance"
)


@dataclasses.dataclass
class Experiment:
    """What the stages share. ``root``: the run whose ``run.json`` records the stages (a
    train-time missingness run's parent); ``is_main`` False: torchrun's other processes, which
    train but write nothing else."""

    config: ExperimentConfig
    run: RunDir
    say: Say = log.info
    progress: bool = True
    store: Any = None  # the feature store, opened once (by the checks, or by ``train``)
    cohort: Any = None
    splits: Any = None
    root: RunDir | None = None
    is_main: bool = True
    started: float = dataclasses.field(default_factory=time.time)
    trained: list[str] = dataclasses.field(default_factory=list)
    tables: Any = None  # the evaluation's tables, when this call evaluated
    after_method: Callable[[], None] | None = None  # the tracker's sync, after each method

    def __post_init__(self) -> None:
        self.root = self.root or self.run
        self.features = FeatureIdentities(self.config.features.dir)

    def feature_store(self):
        if self.config.training.on_tiles:
            return None  # bags of tiles, read by the trainer
        if self.store is None:
            from bidistill.training import open_feature_store

            # Opening checks every feature file (features/hygiene.py): before any training.
            self.store = open_feature_store(self.config, self.cohort, progress=self.progress)
        return self.store


def load_cohort_stage(exp: Experiment) -> None:
    from bidistill.cohort import load_cohort

    exp.say(f"loading the cohort table {exp.config.cohort.table}")
    exp.cohort = load_cohort(exp.config.cohort)
    if exp.cohort.label_summary is not None:
        exp.say(exp.cohort.label_summary.format())


def features_stage(exp: Experiment) -> None:
    """Tile and extract what is missing, then check the features against the config and the
    run's trained methods."""
    from bidistill.experiment.checks import check_cohort_features
    from bidistill.features.store import feature_path
    from bidistill.slides.stage import tile_from_config

    config, slides = exp.config, exp.cohort.slides
    slide_ids = [] if slides is None else [str(s) for s in slides["slide_id"]]
    if not slide_ids:
        return
    if config.features.random_init:
        log.warning("%s", RANDOM_FEATURES_WARNING)  # the CLI shows it once, as `warning:`
    if config.training.on_tiles:  # the methods read tiles and train the encoder
        _say_summary(tile_from_config(config, progress=exp.progress, hint=RUN_HINT), exp)
        return
    from bidistill.features.extract import extract_from_config, out_of_date_slides

    missing = [s for s in slide_ids if not feature_path(config.features.dir, s).is_file()]
    missing += out_of_date_slides(config)  # a slide replaced under the same id is redone
    if missing and config.slides is not None:
        log.info("%d of %d slides lack current features", len(missing), len(slide_ids))
        _say_summary(tile_from_config(config, progress=exp.progress, hint=RUN_HINT), exp)
        _say_summary(extract_from_config(config, progress=exp.progress, hint=RUN_HINT), exp)
    elif not missing:
        log.info("features: all %d slides done, tiling and extraction skipped", len(slide_ids))
    check_cohort_features(config, slide_ids, exp.run.path)


def _say_summary(summary, exp: Experiment) -> None:
    if not exp.progress:
        return
    from rich.console import Console

    line = f"{summary.stage}: {summary.counts()}"
    if summary.redone:
        line += f", {len(summary.redone)} redone ({'; '.join(summary.redone.values())})"
    if summary.failed:
        line += f", {len(summary.failed)} failed: {', '.join(summary.failed)}"
    Console(stderr=True).print(line, highlight=False, soft_wrap=True)


def splits_stage(exp: Experiment) -> None:
    """``splits.json``, made again only when the patients or the split settings changed (a
    changed label keeps the splits: they are the run's record of who is tested); then every
    evaluated split is checked for both classes."""
    from bidistill.cohort import Splits, make_splits, resolve_splits
    from bidistill.cohort.splits import check_splits
    from bidistill.experiment.checks import check_trainable_cohort

    path, split_cfg, cohort = exp.run.splits, exp.config.cohort.splits, exp.cohort
    table_split = cohort.patients["split"].where(cohort.patients["split"].notna(), None)
    inputs = StageInputs()
    inputs.add("config", split_cfg.model_dump(mode="json"), says="cohort.splits settings")
    inputs.add_items(
        "patients", table_split.to_dict(), says="the cohort's patients", unit="patient(s)"
    )
    check = check_stage(exp.run.path, "splits", inputs, [path])
    if check:
        splits = Splits.load(path)
        check_splits(splits, cohort)
    elif not check.recorded:  # made before records existed: reuse
        splits = resolve_splits(cohort, split_cfg, path)
    else:
        exp.say(f"splits: made again: {check.reason}")
        splits = make_splits(cohort, split_cfg)
        splits.save(path)
    if not check:
        record_stage(exp.run.path, "splits", inputs)
    check_trainable_cohort(cohort, splits)
    exp.splits = splits


def cohort_summary_stage(exp: Experiment) -> None:
    """``cohort.json``: what the report says about the cohort beyond the per-split counts."""
    from bidistill.features.identity import read_identity
    from bidistill.features.store import feature_dim, feature_path

    config, cohort = exp.config, exp.cohort
    clinical = cohort.clinical_frame
    summary: dict[str, Any] = {
        "patients": int(len(cohort.patients)),
        "slides": int(len(cohort.slides)),
        "clinical_missing": {c: float(clinical[c].isna().mean()) for c in clinical.columns},
        "feature encoder": config.features.encoder,
    }
    random_init = config.features.random_init
    if len(cohort.slides):
        first = feature_path(config.features.dir, str(cohort.slides["slide_id"].iloc[0]))
        if first.is_file():
            summary["feature dimension"] = feature_dim(first)
            # The files' own record of their encoder is the truth the report's banner reads
            # (synthetic features, random-init encoders); the config only names what it expects.
            identity = read_identity(first)  # attributes only: the features may be huge
            if identity.encoder:
                summary["feature encoder"] = identity.encoder
            random_init = random_init or bool(identity.random_init)
    if random_init:  # the report shows this as a banner
        summary["warning"] = RANDOM_FEATURES_WARNING
    write_json(exp.run.cohort_summary, summary)


def train_stage(
    exp: Experiment,
    methods: list[MethodConfig] | None = None,
    folds: list[int] | None = None,
) -> list[str]:
    """Train each method (default: the config's) on each fold (default: all) whose record does
    not match its inputs; join a k-fold method's predictions once every fold is trained.
    Returns the methods trained."""
    from bidistill.training import train_method

    methods = exp.config.methods if methods is None else methods
    fold_count = len(exp.splits.folds)
    folds = list(range(fold_count)) if folds is None else folds
    trained, current = [], []
    for method_cfg in methods:
        did = [_train_fold(exp, method_cfg, fold, train_method) for fold in folds]
        if fold_count > 1 and exp.is_main:
            _join_folds(exp.run, method_cfg.key, fold_count, again=any(did))
        if any(did):
            trained.append(method_cfg.key)
            if exp.after_method is not None:
                exp.after_method()
        else:
            current.append(method_cfg.key)
    if current:
        where = exp.root.stage_name(exp.run.path) if exp.run.path != exp.root.path else ""
        exp.say(f"up to date in {where or 'this run'}, kept: {', '.join(current)}")
    exp.trained += [exp.root.stage_name(exp.run.joined(key).path) for key in trained]
    return trained


def _train_fold(exp: Experiment, method_cfg: MethodConfig, fold: int, train_method) -> bool:
    out = exp.run.method(method_cfg.key, fold, len(exp.splits.folds))
    stage = exp.root.stage_name(out.path)
    chosen = exp.splits.folds[fold]
    split_ids = {"train": chosen.train, "val": chosen.val, "test": exp.splits.test}
    inputs = method_inputs(exp.config, method_cfg, exp.cohort, split_ids, exp.features)
    check = check_stage(exp.root.path, stage, inputs, [out.predictions])
    if check:
        return False
    if exp.is_main:
        exp.say(f"{stage}: training" + (f" again: {check.reason}" if check.recorded else ""))
        forget_stage(exp.root.path, stage)
        out.predictions.unlink(missing_ok=True)  # stale: the method is not done until retrained
    train_method(
        exp.config,
        method_cfg,
        out,
        cohort=exp.cohort,
        splits=exp.splits,
        fold=fold,
        store=exp.feature_store(),
        progress=exp.progress,
    )
    if exp.is_main:
        record_stage(exp.root.path, stage, inputs)
    return True


def _join_folds(run: RunDir, key: str, folds: int, *, again: bool) -> None:
    """The method's predictions at the run's top: every fold's (with their ``fold`` column)."""
    parts = [run.method(key, k, folds) for k in range(folds)]
    joined = run.joined(key)
    if all(p.done for p in parts) and (again or not joined.done):
        frames = [p.read_predictions() for p in parts]
        write_csv(joined.predictions, pd.concat(frames, ignore_index=True))


def evaluate_stage(exp: Experiment, *, force: bool = False) -> None:
    """Evaluate ``exp.run`` unless its record matches the predictions and settings (or
    ``force``); ``exp.tables`` holds the tables when it evaluated."""
    from bidistill.evaluation import evaluate_run
    from bidistill.evaluation.freshness import evaluation_inputs, evaluation_outputs

    stage = exp.root.stage_name(exp.run.path / "evaluate")
    inputs = evaluation_inputs(exp.run.path, exp.config)
    check = check_stage(exp.root.path, stage, inputs, evaluation_outputs(exp.run.path))
    if check and not force:
        exp.say(f"{stage}: up to date")
        return
    if not force:  # (`bidistill evaluate` keeps the record of a run it refuses to evaluate)
        exp.say(f"{stage}: evaluating" + (f" again: {check.reason}" if check.recorded else ""))
        forget_stage(exp.root.path, stage)
    log.info("evaluating %d methods", len(exp.config.methods))
    provenance = None
    if exp.run.path == exp.root.path and not force:
        provenance = {
            "run started": _stamp(exp.started),
            "run time until evaluation (s)": round(time.time() - exp.started, 1),
        }
    exp.tables = evaluate_run(exp.run.path, config=exp.config, provenance=provenance)
    record_stage(exp.root.path, stage, inputs)


def record_call(exp: Experiment) -> None:
    """Add this call of `bidistill run` (start, seconds, what it trained) to ``run.json``."""
    info = read_run_info(exp.run.path)
    info.setdefault("calls", []).append(
        {
            "started": _stamp(exp.started),
            "seconds": round(time.time() - exp.started, 1),
            "trained": exp.trained,
        }
    )
    write_run_info(exp.run.path, info)


def write_resolved_config(config: ExperimentConfig, run: RunDir) -> None:
    """The run's ``config.yaml``, rewritten only when it changed (its mtime then says when)."""
    text = dump_config(config)
    if not run.config.is_file() or run.config.read_text(encoding="utf-8") != text:
        write_text(run.config, text)


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def train_missing_stage(exp: Experiment) -> None:
    """Every method again with a share of the training patients stripped of all clinical data
    (``evaluation.train_missing_rates``), each in ``train_missing/<rate>/`` and evaluated there;
    ``train_missing.csv`` has one row per training rate, method and test rate."""
    rates = exp.config.evaluation.train_missing_rates
    if not rates:
        return
    if len(exp.splits.folds) > 1:
        raise ConfigError(
            "evaluation.train_missing_rates needs a holdout split (cohort.splits.mode other "
            "than kfold): in k-fold mode a training patient of one fold is a validation "
            "patient of another"
        )
    rows = []
    for rate in rates:
        run = exp.run.train_missing(rate)
        run.path.mkdir(parents=True, exist_ok=True)
        write_resolved_config(exp.config, run)
        exp.splits.save(run.splits)  # the same bytes when unchanged
        sub = dataclasses.replace(
            exp,
            run=run,
            root=exp.root,
            cohort=strip_training_clinical(exp.cohort, exp.splits, rate),
            trained=[],
            after_method=None,
        )
        train_stage(sub)
        evaluate_stage(sub)
        exp.trained += sub.trained
        rows.append(pd.read_csv(run.metrics).assign(train_missing_rate=rate))
    table = pd.concat(rows, ignore_index=True)
    first = ["train_missing_rate", "method", "missing_rate"]
    write_csv(exp.run.train_missing_table, table[first + [c for c in table if c not in first]])


def strip_training_clinical(cohort, splits, rate: float):
    """A copy of ``cohort`` in which a share ``rate`` of each fold's training patients has no
    clinical data (nested, label-stratified masks, mask seed 0; val and test untouched)."""
    from bidistill.evaluation.missing import nested_masks

    patients = cohort.patients.copy()
    features = cohort.feature_names
    for fold in splits.folds:
        ids = [str(p) for p in fold.train]
        rows = patients.loc[ids]
        available = rows[features].notna().any(axis=1).to_numpy()
        mask = nested_masks(ids, rows["label"].to_numpy(), available, [rate], [0])[0, 0]
        patients.loc[np.asarray(ids)[mask], features] = np.nan
    return dataclasses.replace(cohort, patients=patients)


# `bidistill run`'s stages, in order.
STAGES: tuple[Callable[[Experiment], Any], ...] = (
    load_cohort_stage,
    features_stage,
    splits_stage,
    cohort_summary_stage,
    train_stage,
    evaluate_stage,
    train_missing_stage,
)
