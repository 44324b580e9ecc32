"""What the report says about a run beyond its metrics (method options and training, confusion
matrices, synthetic data), read from the run folder and the evaluation's tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bidistill.config import ExperimentConfig
from bidistill.evaluation.missing import SplitSweep
from bidistill.runs.rundir import RunDir


@dataclass
class MethodInfo:
    """One method entry of the run: its options and how its training went."""

    key: str  # folder and report name
    name: str  # registry name
    given: dict[str, Any]  # options set in the config
    options: dict[str, Any]  # every option, defaults included (from model.json)
    epochs_run: int | None = None
    best_epochs: list[int] = field(default_factory=list)  # per stage, counted from 1
    train_seconds: float | None = None


def method_infos(run_dir: Path, methods: list[str], config: ExperimentConfig | None):
    """The options and training summary of every method (fold 0 in k-fold runs)."""
    configured = {m.key: m for m in config.methods} if config else {}
    logs = training_logs(run_dir, methods)
    infos = []
    for key in methods:
        entry = configured.get(key)
        meta = model_json(run_dir, key)
        log = logs.get(key)
        infos.append(
            MethodInfo(
                key=key,
                name=meta.get("method") or (entry.name if entry else key),
                given=entry.options if entry else {},
                options=meta.get("options", {}),
                epochs_run=len(log) if log is not None else None,
                best_epochs=best_epochs(log, meta.get("selection")) if log is not None else [],
                train_seconds=meta.get("train_seconds"),
            )
        )
    return infos


def selection_column(log: pd.DataFrame) -> str | None:
    """The training log's model-selection score (what early stopping watched)."""
    return next((c for c in ("val_score", "val_auc_present") if c in log), None)


def best_epochs(log: pd.DataFrame, selection: list[dict] | None = None) -> list[int]:
    """The kept epochs, counted from 1 over the whole log's rows: per stage, one per part, from
    the trainer's record ``selection`` (it knows the parts and the epochs that were no
    candidates), else each stage's best selection score."""
    stages = log["stage"].astype(str).to_numpy() if "stage" in log else np.zeros(len(log), str)
    if selection and "epoch" in log:
        epochs = log["epoch"].to_numpy()
        out = []
        for stage in selection:
            for part in stage.get("parts", []):
                rows = np.flatnonzero((stages == stage["stage"]) & (epochs == part["best_epoch"]))
                out += [int(rows[0]) + 1] if len(rows) else []
        if out:
            return out
    column = selection_column(log)
    if column is None:
        return []
    scores = log[column].to_numpy(dtype=float)
    out = []
    for stage in dict.fromkeys(stages):
        rows = np.flatnonzero(stages == stage)
        finite = rows[np.isfinite(scores[rows])]
        if len(finite):
            out.append(int(finite[np.argmax(scores[finite])]) + 1)
    return out


def model_json(run_dir: Path, key: str) -> dict[str, Any]:
    method = RunDir(run_dir).model_dir(key)
    return method.read_meta() if method.meta.is_file() else {}


def training_logs(run_dir: Path, methods: list[str]) -> dict[str, pd.DataFrame]:
    """Each method's ``train_log.csv`` (fold 0 in k-fold runs); methods without one are left out."""
    logs = {}
    for key in methods:
        path = RunDir(run_dir).model_dir(key).train_log
        if path.is_file():
            frame = pd.read_csv(path)
            if len(frame):
                logs[key] = frame
    return logs


def confusion_rows(
    sweep: SplitSweep, by_seed: pd.DataFrame, class_names: list[str] | None = None
) -> pd.DataFrame:
    """TP, FN, FP, TN of every method on the test patients at the first and last missing rate,
    at the threshold the evaluation chose on validation (fold and first mask seed of ``sweep``;
    at rates 0 and 1 every mask seed withholds the same patients). With K > 2 classes the K x K
    matrix at the argmax decision: a row per true class, a column per predicted class."""
    rates = sorted({0, len(sweep.rates) - 1})
    if sweep.n_classes > 2:
        return _class_confusion_rows(sweep, rates, class_names)
    seed = int(sweep.seeds[0])
    rows = []
    for method, probs in sweep.probs.items():
        for r in rates:
            rate = float(sweep.rates[r])
            match = by_seed[
                (by_seed["method"] == method)
                & np.isclose(by_seed["missing_rate"], rate)
                & (by_seed["fold"] == sweep.fold)
                & (by_seed["mask_seed"] == seed)
            ]
            threshold = float(match["threshold"].iloc[0])
            predicted = probs[0, r] >= threshold
            truth = sweep.labels.astype(bool)
            rows.append(
                {
                    "method": method,
                    "missing_rate": rate,
                    "threshold": threshold,
                    "tp": int(np.sum(predicted & truth)),
                    "fn": int(np.sum(~predicted & truth)),
                    "fp": int(np.sum(predicted & ~truth)),
                    "tn": int(np.sum(~predicted & ~truth)),
                }
            )
    return pd.DataFrame(rows)


def _class_confusion_rows(sweep: SplitSweep, rates: list[int], names) -> pd.DataFrame:
    from bidistill.evaluation.multiclass import confusion_matrix

    names = names or [f"class {k}" for k in range(sweep.n_classes)]
    rows = []
    for method, probs in sweep.probs.items():
        for r in rates:
            matrix = confusion_matrix(sweep.labels, probs[0, r])
            for k, name in enumerate(names):
                where = {"method": method, "missing_rate": float(sweep.rates[r]), "true": name}
                rows.append(where | {f"→ {p}": int(n) for p, n in zip(names, matrix[k])})
    return pd.DataFrame(rows)


def synthetic_notice(cohort: dict[str, Any], config: ExperimentConfig | None) -> str | None:
    """The banner text when the features are synthetic or come from an untrained encoder: the
    feature files' own encoder name decides (the config's is the fallback)."""
    encoder = str(cohort.get("feature encoder") or (config.features.encoder if config else ""))
    lowered = encoder.lower()
    if lowered.startswith("synthetic"):
        return (
            f"Synthetic data: the features of this run (encoder '{encoder}') are random "
            "vectors with a planted signal, made by bidistill.synthetic, not histology. The "
            "numbers show how the methods behave, not how well they would predict anything "
            "in patients."
        )
    initialised = cohort.get("warning") or (config is not None and config.features.random_init)
    if not initialised and "random" not in lowered:
        return None
    how = ": the features come from a RANDOMLY INITIALISED encoder (features.random_init)"
    return (
        f"Random features: the patch encoder '{encoder}' has random, untrained weights"
        f"{how if initialised else ''}. The numbers test the pipeline, not what a trained "
        "encoder would achieve."
    )
