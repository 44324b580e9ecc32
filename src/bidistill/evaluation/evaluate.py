"""Evaluate a run directory: every method's predictions swept over the missing rates, the
statistics, tables, figures and report, each written atomically through ``RunDir``.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bidistill._io import write_csv, write_text
from bidistill._text import count, verb
from bidistill.config import EvaluationConfig, ExperimentConfig, dump_config, load_config
from bidistill.evaluation import plots
from bidistill.evaluation.inputs import PredictionsError, read_method_predictions
from bidistill.evaluation.missing import SplitSweep, sweep_split
from bidistill.evaluation.report import FigureGroup, ReportInputs, render_markdown
from bidistill.evaluation.report_html import render_html
from bidistill.evaluation.run_info import (
    best_epochs,
    confusion_rows,
    method_infos,
    model_json,
    selection_column,
    synthetic_notice,
    training_logs,
)
from bidistill.evaluation.summary import EvaluationTables, summarize
from bidistill.runs.fingerprint import read_run_info
from bidistill.runs.rundir import MethodDir, RunDir

log = logging.getLogger(__name__)

PACKAGES = ("bidistill", "torch", "numpy", "pandas", "scikit-learn", "scipy", "timm")


def evaluate_run(
    run_dir: str | Path,
    *,
    config: ExperimentConfig | None = None,
    provenance: dict[str, Any] | None = None,
) -> EvaluationTables:
    """Write the tables, figures and report of every method of a run directory; ``config``
    defaults to the run's own, else the default evaluation settings over every trained method
    folder; ``provenance`` adds entries to the report's provenance section."""
    run = RunDir(run_dir)
    run_dir = run.path
    start = time.perf_counter()
    if config is None and run.config.is_file():
        config = load_config(run.config)
    eval_cfg = config.evaluation if config else EvaluationConfig()
    methods = _methods(run_dir, config)
    predictions = {m: read_method_predictions(run.joined(m).predictions) for m in methods}
    check_against_splits(run_dir, predictions)
    test, val = _sweeps(predictions, eval_cfg)
    tables = summarize(test, val, eval_cfg)

    test_frames = [s.to_frame().assign(fold=s.fold) for s in test]
    long = pd.concat(test_frames, ignore_index=True)
    if len(test) == 1:  # the DESIGN columns exactly; k-fold runs add the fold
        long = long.drop(columns="fold")
    write_csv(run.predictions, long)
    write_csv(run.metrics, tables.metrics)
    write_csv(run.metrics_by_seed, tables.by_seed)
    write_csv(run.delong, tables.delong)

    names = class_names(config, test[0].n_classes)
    figures = _figures(run_dir, tables, test, eval_cfg.reference_method, methods, names)
    cohort = _cohort_section(run_dir, predictions[methods[0]], names)
    report = ReportInputs(
        title=f"bidistill report: {config.name if config else run_dir.name}",
        metrics=tables.metrics,
        delong=tables.delong,
        figures=figures,
        reference=eval_cfg.reference_method,
        evaluation=eval_cfg,
        folds=len(test),
        cohort=cohort,
        provenance={
            **collect_provenance(config),
            **_run_times(run_dir),
            **(provenance or {}),
            "evaluation time (s)": round(time.perf_counter() - start, 1),
        },
        config_text=dump_config(config) if config else "",
        methods=method_infos(run_dir, methods, config),
        confusion=confusion_rows(test[0], tables.by_seed, names),
        synthetic=synthetic_notice(cohort, config),
        label=_label_text(config),
    )
    write_text(run.report, render_html(report))
    write_text(run.report_markdown, render_markdown(report, run_dir))
    log.info("evaluated %d methods in %.1f s", len(methods), time.perf_counter() - start)
    return tables


def _figures(
    run_dir: Path,
    tables: EvaluationTables,
    test: list[SplitSweep],
    reference: str,
    methods: list[str],
    names: list[str],
) -> list[FigureGroup]:
    """Every figure of the report, grouped as the report shows them."""
    folder = RunDir(run_dir).figures
    metrics = tables.metrics
    auc = plots.plot_auc_vs_missing(metrics, folder / "auc_vs_missing.png", reference=reference)
    groups = [
        FigureGroup(
            "auc-vs-missing",
            "AUC versus missing clinical data",
            "Each method's AUC as clinical data is withheld from a growing share of the test "
            "patients; bars are 95% bootstrap CIs, nudged sideways so that they do not overlap."
            + (
                " With more than two classes the AUC is the macro one-vs-rest AUC."
                if len(names) > 2
                else ""
            ),
            [(auc, "AUC of every method against the missing rate")],
            wide=True,
        ),
        *(
            _roc_groups(test, metrics, folder)
            if len(names) == 2
            else [_class_roc_group(test, metrics, folder, names)]
        ),
    ]
    logs = training_logs(run_dir, methods)
    loss = next((c for c in ("loss_total", "loss") if any(c in f for f in logs.values())), None)
    if logs and loss:
        columns = {selection_column(f) for f in logs.values()} - {None}
        score = sorted(columns)[0] if columns else "val_score"
        kept = {m: best_epochs(f, model_json(run_dir, m).get("selection")) for m, f in logs.items()}
        auc_label = "validation AUC (model selection)"
        loss_png = plots.plot_training(
            logs, folder / "training_loss.png", column=loss, label="training loss"
        )
        auc_png = plots.plot_training(
            logs, folder / "training_val_auc.png", column=score, label=auc_label, best=kept
        )
        curves = [(loss_png, "Training loss per epoch"), (auc_png, "Validation AUC per epoch")]
        fold = " (fold 0)" if len(test) > 1 else ""
        groups.append(
            FigureGroup(
                "training",
                "Training curves",
                f"From each method's {MethodDir(run_dir).train_log.name}{fold}: the training loss, "
                "and the validation AUC that early stopping selects on (a dot marks the epoch "
                "whose weights were kept). Epochs are counted from 1 across a method's stages.",
                curves,
            )
        )
    return groups


def _roc_groups(test: list[SplitSweep], metrics: pd.DataFrame, folder: Path) -> list[FigureGroup]:
    """A binary label's ROC curves and calibration."""
    rocs = []
    for r in plots.roc_rate_indices(test[0].rates):
        rate = float(test[0].rates[r])
        at_rate = metrics[np.isclose(metrics["missing_rate"], rate)]
        path = plots.plot_roc(
            test, r, folder / f"roc_r{rate:g}.png", aucs=dict(zip(at_rate.method, at_rate.auc))
        )
        rocs.append((path, f"ROC curves at missing rate {rate:g}"))
    calibration = []
    for r in sorted({0, len(test[0].rates) - 1}):
        rate = float(test[0].rates[r])
        path = plots.plot_calibration(test, r, folder / f"calibration_r{rate:g}.png")
        calibration.append((path, f"Calibration at missing rate {rate:g}"))
    replicates = sum(len(t.seeds) for t in test)
    return [
        FigureGroup(
            "roc",
            "ROC curves",
            f"Mean sensitivity over the {replicates} mask-seed replicates at each false-positive "
            "rate (at r = 0 and r = 1 every replicate is the same); the legend gives each "
            "method's AUC from the table above.",
            rocs,
        ),
        FigureGroup(
            "calibration",
            "Calibration",
            "Observed share of positive patients against the predicted probability, in bins of "
            "0.1; underneath, how many test patients fall in each bin. On the dashed line the "
            "probabilities mean what they say.",
            calibration,
        ),
    ]


def _class_roc_group(
    test: list[SplitSweep], metrics: pd.DataFrame, folder: Path, names: list[str]
) -> FigureGroup:
    """A K-class label's one-vs-rest ROC curves per class at the first and last rate."""
    rocs = []
    for r in sorted({0, len(test[0].rates) - 1}):
        rate = float(test[0].rates[r])
        at_rate = metrics[np.isclose(metrics["missing_rate"], rate)]
        per_class = at_rate[[f"auc_{k}" for k in range(len(names))]].to_numpy()
        path = plots.plot_class_roc(
            test,
            r,
            folder / f"roc_r{rate:g}.png",
            class_names=names,
            aucs=dict(zip(at_rate.method, per_class)),
        )
        rocs.append((path, f"One-vs-rest ROC curves per class at missing rate {rate:g}"))
    return FigureGroup(
        "roc",
        "ROC curves per class",
        "Each class against the rest, by that class's predicted probability: mean sensitivity "
        "over the mask-seed replicates at each false-positive rate; the legend gives each "
        "method's one-vs-rest AUC of that class.",
        rocs,
        wide=True,
    )


def class_names(config: ExperimentConfig | None, n_classes: int) -> list[str]:
    """The label's class names in code order (``class <k>`` without a config)."""
    if config is not None and config.cohort.label.n_classes == n_classes:
        return config.cohort.label.class_names
    if n_classes == 2:
        return ["negative", "positive"]
    return [f"class {k}" for k in range(n_classes)]


def _label_text(config: ExperimentConfig | None) -> str:
    return "the label" if config is None else config.cohort.label.describe()


def _methods(run_dir: Path, config: ExperimentConfig | None) -> list[str]:
    run = RunDir(run_dir)
    if config is not None:
        methods = [m.key for m in config.methods]
        if missing := [m for m in methods if not run.joined(m).done]:
            raise PredictionsError(
                f"{run_dir}: no {run.predictions.name} for method(s) {missing}; train them "
                f"with `bidistill run CONFIG --out {run_dir}`"
            )
        return methods
    if not (methods := [m.key for m in run.predicted_methods()]):
        raise PredictionsError(f"{run_dir}: no <method>/{run.predictions.name} to evaluate")
    return methods


def check_against_splits(run_dir: Path, predictions: dict[str, pd.DataFrame]) -> None:
    """``PredictionsError`` unless every method predicts exactly the validation and test
    patients of the run's splits: an AUC over what is left of an edited or truncated file would
    look like a result."""
    from bidistill.cohort import Splits

    splits_path = RunDir(run_dir).splits
    if not splits_path.is_file():
        return
    splits = Splits.load(splits_path)
    for method, frame in predictions.items():
        path = RunDir(run_dir).joined(method).predictions
        for fold, chosen in enumerate(splits.folds):
            rows = frame[frame["fold"] == fold] if len(splits.folds) > 1 else frame
            for split, expected in (("test", splits.test), ("val", chosen.val)):
                found = set(rows.loc[rows["split"] == split, "patient_id"])
                missing = sorted(set(map(str, expected)) - found)
                extra = sorted(found - set(map(str, expected)))
                if missing or extra:
                    where = f"fold {fold}, " if len(splits.folds) > 1 else ""
                    problem = (
                        f"{count(len(missing), f'{split} patient')} of {splits_path.name} "
                        f"{verb(len(missing), 'has', 'have')} no prediction "
                        f"({_first(missing)})"
                        if missing
                        else f"{count(len(extra), f'{split} patient')} "
                        f"{verb(len(extra), 'is', 'are')} not in {splits_path.name} "
                        f"({_first(extra)})"
                    )
                    raise PredictionsError(
                        f"{path}: {where}{problem}; the file does not match the run's splits: "
                        f"train the method again with `bidistill run CONFIG --out {run_dir}`"
                    )


def _first(ids: list[str], shown: int = 5) -> str:
    return ", ".join(ids[:shown]) + (", …" if len(ids) > shown else "")


def _sweeps(
    predictions: dict[str, pd.DataFrame], cfg: EvaluationConfig
) -> tuple[list[SplitSweep], list[SplitSweep | None]]:
    """Test and validation sweeps of every fold."""
    first = next(iter(predictions.values()))
    folds = sorted(first.loc[first["split"] == "test", "fold"].unique())
    if not folds:
        raise PredictionsError("the predictions have no test patients to evaluate")
    seeds = list(range(cfg.mask_seeds))
    grid = {"rates": cfg.missing_rates, "seeds": seeds}
    test = [sweep_split(predictions, split="test", fold=f, **grid) for f in folds]
    val = [
        sweep_split(predictions, split="val", fold=f, **grid)
        if ((first["split"] == "val") & (first["fold"] == f)).any()
        else None
        for f in folds
    ]
    return test, val


def _cohort_section(run_dir: Path, predictions: pd.DataFrame, names: list[str]) -> dict[str, Any]:
    """Patients per split with label balance and clinical missingness, plus ``cohort.json``."""
    fold0 = predictions[predictions["fold"] == predictions["fold"].min()]
    splits = []
    for split in ("train", "val", "test"):
        rows = fold0[fold0["split"] == split]
        if not len(rows):
            continue
        balance = (
            {
                "positive": int(rows["label"].sum()),
                "positive share": f"{rows['label'].mean():.1%}",
            }
            if len(names) == 2
            else {name: int((rows["label"] == k).sum()) for k, name in enumerate(names)}
        )
        splits.append(
            {
                "split": split,
                "patients": len(rows),
                **balance,
                "no clinical data": int((~rows["clinical_available"]).sum()),
            }
        )
    section: dict[str, Any] = {"splits": splits}
    extra = RunDir(run_dir).cohort_summary
    if extra.is_file():
        section.update(json.loads(extra.read_text(encoding="utf-8")))
    return section


def _run_times(run_dir: Path) -> dict[str, Any]:
    """When the run started and how long its `bidistill run` calls took (from ``run.json``)."""
    calls = read_run_info(run_dir).get("calls", [])
    if not calls:
        return {}
    return {
        "run started": calls[0]["started"],
        "run time of earlier calls (s)": round(sum(c["seconds"] for c in calls), 1),
    }


def collect_provenance(config: ExperimentConfig | None) -> dict[str, Any]:
    """Seeds, package versions and the git commit of the installed bidistill source."""
    info: dict[str, Any] = {}
    if config is not None:
        info["training seed"] = config.training.seed
        info["split seed"] = config.cohort.splits.seed
        info["mask seeds"] = f"0..{config.evaluation.mask_seeds - 1}"
    info["python"] = platform.python_version()
    for package in PACKAGES:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    if commit := git_commit():
        info["git commit"] = commit
    return info


def git_commit() -> str | None:
    """The commit of the bidistill source tree, with ``+dirty`` for local changes; None if
    the package is not in a git checkout (e.g. installed from a wheel)."""
    source = Path(__file__).resolve().parents[1]  # src/bidistill

    def git(*args: str) -> str:
        command = ["git", "-C", str(source), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=5, check=True).stdout

    try:
        commit, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.strip() + ("+dirty" if dirty.strip() else "")
