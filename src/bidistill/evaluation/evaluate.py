"""Evaluate a run directory: sweep, statistics, tables, figures and report.

Reads ``<run_dir>/<method>/predictions.csv`` for every method, and ``<run_dir>/config.yaml`` and
``<run_dir>/cohort.json`` when they exist. Writes (atomically) ``predictions.csv``,
``metrics.csv``, ``metrics_by_seed.csv``, ``delong.csv``, ``figures/*.png``, ``report.html`` and
``report.md``.
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

import pandas as pd

from bidistill._io import write_csv
from bidistill.config import EvaluationConfig, ExperimentConfig, dump_config, load_config
from bidistill.evaluation import plots
from bidistill.evaluation.inputs import (
    PredictionsError,
    method_predictions_path,
    read_method_predictions,
)
from bidistill.evaluation.missing import SplitSweep, sweep_split
from bidistill.evaluation.report import ReportInputs, write_report
from bidistill.evaluation.summary import EvaluationTables, summarize

log = logging.getLogger(__name__)

RUN_OUTPUTS = (
    "predictions.csv",
    "metrics.csv",
    "metrics_by_seed.csv",
    "delong.csv",
    "report.html",
    "report.md",
)
PACKAGES = ("bidistill", "torch", "numpy", "pandas", "scikit-learn", "scipy", "timm")


def evaluate_run(
    run_dir: str | Path,
    *,
    config: ExperimentConfig | None = None,
    provenance: dict[str, Any] | None = None,
) -> EvaluationTables:
    """Evaluate every method of a run directory and write the tables, figures and report.

    Args:
        run_dir: the run directory.
        config: the experiment config; default: ``<run_dir>/config.yaml``, or the default
            evaluation settings with every method folder that has a ``predictions.csv``.
        provenance: extra entries for the report's provenance section (e.g. run times).

    Returns:
        The tables that were written.

    Raises:
        PredictionsError: no method to evaluate, a configured method without predictions, or
            predictions that break the contract.
    """
    run_dir = Path(run_dir)
    start = time.perf_counter()
    if config is None and (run_dir / "config.yaml").is_file():
        config = load_config(run_dir / "config.yaml")
    eval_cfg = config.evaluation if config else EvaluationConfig()
    methods = _methods(run_dir, config)
    predictions = {m: read_method_predictions(method_predictions_path(run_dir, m)) for m in methods}
    check_against_splits(run_dir, predictions)
    test, val = _sweeps(predictions, eval_cfg)
    tables = summarize(test, val, eval_cfg)

    test_frames = [s.to_frame().assign(fold=s.fold) for s in test]
    long = pd.concat(test_frames, ignore_index=True)
    if len(test) == 1:  # the DESIGN columns exactly; k-fold runs add the fold
        long = long.drop(columns="fold")
    write_csv(run_dir / "predictions.csv", long)
    write_csv(run_dir / "metrics.csv", tables.metrics)
    write_csv(run_dir / "metrics_by_seed.csv", tables.by_seed)
    write_csv(run_dir / "delong.csv", tables.delong)

    figures = {
        "auc_vs_missing": plots.plot_auc_vs_missing(
            tables.metrics,
            run_dir / "figures" / "auc_vs_missing.png",
            reference=eval_cfg.reference_method,
        ),
        "roc": plots.plot_roc(test[0], run_dir / "figures" / "roc.png"),
        "calibration": plots.plot_calibration(test[0], run_dir / "figures" / "calibration.png"),
    }
    write_report(
        run_dir,
        ReportInputs(
            title=f"bidistill report: {config.name if config else run_dir.name}",
            metrics=tables.metrics,
            delong=tables.delong,
            figures=figures,
            reference=eval_cfg.reference_method,
            protocol={
                "seeds": eval_cfg.mask_seeds,
                "folds": len(test),
                "bootstrap": eval_cfg.bootstrap,
                "threshold": eval_cfg.threshold,
            },
            cohort=_cohort_section(run_dir, predictions[methods[0]]),
            provenance={
                **collect_provenance(config),
                **_run_times(run_dir),
                **(provenance or {}),
                "evaluation time (s)": round(time.perf_counter() - start, 1),
            },
            config_text=dump_config(config) if config else "",
        ),
    )
    log.info("evaluated %d methods in %.1f s", len(methods), time.perf_counter() - start)
    return tables


def _methods(run_dir: Path, config: ExperimentConfig | None) -> list[str]:
    if config is not None:
        methods = [m.key for m in config.methods]
        missing = [m for m in methods if not method_predictions_path(run_dir, m).is_file()]
        if missing:
            raise PredictionsError(
                f"{run_dir}: no predictions.csv for method(s) {missing}; train them with "
                f"`bidistill run CONFIG --out {run_dir}`"
            )
        return methods
    methods = sorted(p.parent.name for p in run_dir.glob("*/predictions.csv"))
    if not methods:
        raise PredictionsError(f"{run_dir}: no <method>/predictions.csv to evaluate")
    return methods


def check_against_splits(run_dir: Path, predictions: dict[str, pd.DataFrame]) -> None:
    """Every method predicts exactly the validation and test patients of ``splits.json``: an
    AUC over what is left of an edited or truncated file would look like a result.

    Raises:
        PredictionsError: naming the file, the split and the patients missing or extra.
    """
    from bidistill.cohort import Splits

    splits_path = run_dir / "splits.json"
    if not splits_path.is_file():
        return
    splits = Splits.load(splits_path)
    for method, frame in predictions.items():
        path = method_predictions_path(run_dir, method)
        for fold, chosen in enumerate(splits.folds):
            rows = frame[frame["fold"] == fold] if len(splits.folds) > 1 else frame
            for split, expected in (("test", splits.test), ("val", chosen.val)):
                found = set(rows.loc[rows["split"] == split, "patient_id"])
                missing = sorted(set(map(str, expected)) - found)
                extra = sorted(found - set(map(str, expected)))
                if missing or extra:
                    where = f"fold {fold}, " if len(splits.folds) > 1 else ""
                    problem = (
                        f"{len(missing)} {split} patients of splits.json have no prediction "
                        f"({_first(missing)})"
                        if missing
                        else f"{len(extra)} {split} patients are not in splits.json "
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


def _cohort_section(run_dir: Path, predictions: pd.DataFrame) -> dict[str, Any]:
    """Patients per split with label balance and clinical missingness, plus ``cohort.json``."""
    fold0 = predictions[predictions["fold"] == predictions["fold"].min()]
    splits = []
    for split in ("train", "val", "test"):
        rows = fold0[fold0["split"] == split]
        if len(rows):
            splits.append(
                {
                    "split": split,
                    "patients": len(rows),
                    "positive": int(rows["label"].sum()),
                    "positive share": f"{rows['label'].mean():.1%}",
                    "no clinical data": int((~rows["clinical_available"]).sum()),
                }
            )
    section: dict[str, Any] = {"splits": splits}
    extra = run_dir / "cohort.json"
    if extra.is_file():
        section.update(json.loads(extra.read_text(encoding="utf-8")))
    return section


def _run_times(run_dir: Path) -> dict[str, Any]:
    """When the run started and how long its `bidistill run` calls took (from ``run.json``)."""
    info = run_dir / "run.json"
    calls = json.loads(info.read_text(encoding="utf-8")).get("calls", []) if info.is_file() else []
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
    commit = git_commit()
    if commit:
        info["git commit"] = commit
    return info


def git_commit() -> str | None:
    """The commit of the bidistill source tree, with ``+dirty`` for local changes; None if
    the package is not in a git checkout (e.g. installed from a wheel)."""
    source = Path(__file__).resolve().parents[1]  # src/bidistill
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
