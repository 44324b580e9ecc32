"""From swept predictions to the run's tables: metrics per method and rate, per replicate, and
the paired tests against the reference method (docs/internal-interfaces.md, "Results").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bidistill.config import EvaluationConfig
from bidistill.evaluation import metrics as M
from bidistill.evaluation import multiclass as MC
from bidistill.evaluation.inputs import PredictionsError
from bidistill.evaluation.missing import SplitSweep
from bidistill.thresholds import FALLBACK_THRESHOLD

log = logging.getLogger(__name__)

# The DESIGN contract's columns come first, in this order.
CONTRACT_COLUMNS = [
    "method",
    "missing_rate",
    "auc",
    "auc_std",
    "auc_ci_low",
    "auc_ci_high",
    "accuracy",
    "f1",
    "sensitivity",
    "specificity",
    "n_patients",
]
THRESHOLD_METRICS = ["accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity"]
SEED_METRICS = ["auc", *THRESHOLD_METRICS, "brier", "ece", "threshold", "missing_share"]
# The columns of one paired test (``paired_test_table``).
TEST_COLUMNS = [
    "auc",
    "auc_reference",
    "auc_difference",
    "z",
    "p_value",
    "p_holm",
    "test",
    "p_floor",
]


@dataclass
class EvaluationTables:
    metrics: pd.DataFrame  # one row per (method, missing_rate): metrics.csv
    by_seed: pd.DataFrame  # one row per (method, missing_rate, fold, mask_seed)
    delong: pd.DataFrame  # one row per (method, missing_rate) other than the reference


def summarize(
    test: list[SplitSweep], val: list[SplitSweep | None], cfg: EvaluationConfig
) -> EvaluationTables:
    """Every table from each fold's test sweep (same patients, methods, rates and seeds) and
    validation sweep (None where a fold has none: the threshold falls back, with a warning)."""
    first = test[0]
    if len(np.unique(first.labels)) < 2:
        raise PredictionsError(
            f"the test split has only label {first.labels[0]}: AUC needs two classes or more"
        )
    if first.n_classes > 2:
        return summarize_classes(test, cfg)
    by_seed = pd.DataFrame([row for t, v in zip(test, val) for row in _replicate_rows(t, v, cfg)])
    ci_rows = []
    n_rates = len(first.rates)
    large = M.large_sample(first.labels)
    n_pos = int(first.labels.sum())
    for method in first.methods:
        low, high = np.full(n_rates, np.nan), np.full(n_rates, np.nan)
        if cfg.bootstrap:
            # [R, n_pos, n_neg], averaged over folds and mask seeds
            kernels = sum(M.pair_kernel(t.probs[method], t.labels).mean(axis=0) for t in test)
            kernels = kernels / len(test)
            if large:
                resampled = M.bootstrap_auc(kernels, n_boot=cfg.bootstrap, seed=0)
                low, high = M.percentile_ci(resampled, cfg.ci_level)
            else:
                n_neg = len(first.labels) - n_pos
                bounds = [
                    M.newcombe_ci(auc, n_pos, n_neg, cfg.ci_level)
                    for auc in kernels.mean(axis=(-2, -1))
                ]
                low, high = np.array(bounds).T
        ci_rows += [
            {"method": method, "missing_rate": rate, "auc_ci_low": lo, "auc_ci_high": hi}
            for rate, lo, hi in zip(first.rates, low, high)
        ]
    metrics = _aggregate(by_seed, pd.DataFrame(ci_rows), n_patients=len(first.patient_ids))
    metrics["n_positive"] = n_pos
    metrics["auc_ci_method"] = ("bootstrap" if large else "newcombe") if cfg.bootstrap else ""
    delong = _delong_table(test, cfg.reference_method)
    return EvaluationTables(metrics=metrics, by_seed=by_seed, delong=delong)


def _replicate_rows(
    test: SplitSweep, val: SplitSweep | None, cfg: EvaluationConfig
) -> list[dict[str, object]]:
    rows = []
    val_usable = val is not None and len(np.unique(val.labels)) == 2
    if cfg.threshold == "youden" and not val_usable:
        log.warning(
            "fold %d: no validation patients of both classes; using threshold %.1f",
            test.fold,
            FALLBACK_THRESHOLD,
        )
    for method, probs in test.probs.items():
        kernels = M.pair_kernel(probs, test.labels)  # [K, R, n_pos, n_neg]
        aucs = kernels.mean(axis=(-2, -1))  # [K, R]
        for k, seed in enumerate(test.seeds):
            for r, rate in enumerate(test.rates):
                if not isinstance(cfg.threshold, str):
                    threshold = float(cfg.threshold)
                elif val_usable:
                    threshold = M.youden_threshold(val.labels, val.probs[method][k, r])
                else:
                    threshold = FALLBACK_THRESHOLD
                p = probs[k, r]
                rows.append(
                    {
                        "method": method,
                        "missing_rate": rate,
                        "fold": test.fold,
                        "mask_seed": int(seed),
                        "auc": aucs[k, r],
                        **M.threshold_metrics(test.labels, p, threshold),
                        "brier": M.brier_score(test.labels, p),
                        "ece": M.expected_calibration_error(test.labels, p),
                        "threshold": threshold,
                        "missing_share": float(test.masks[k, r].mean()),
                    }
                )
    return rows


def _aggregate(by_seed: pd.DataFrame, ci: pd.DataFrame, *, n_patients: int) -> pd.DataFrame:
    keys = ["method", "missing_rate"]
    order = list(dict.fromkeys(by_seed["method"]))
    means = by_seed.groupby(keys, sort=False)[SEED_METRICS].mean()
    # std over seeds of the fold-mean AUC; std over folds of the seed-mean AUC.
    seed_auc = by_seed.groupby([*keys, "mask_seed"], sort=False)["auc"].mean()
    fold_auc = by_seed.groupby([*keys, "fold"], sort=False)["auc"].mean()
    means["auc_std"] = seed_auc.groupby(level=keys, sort=False).std(ddof=0)
    means["auc_fold_std"] = fold_auc.groupby(level=keys, sort=False).std(ddof=0)
    means["n_folds"] = fold_auc.groupby(level=keys, sort=False).size()
    means["n_mask_seeds"] = seed_auc.groupby(level=keys, sort=False).size()
    table = means.reset_index().merge(ci, on=keys, how="left")
    table["n_patients"] = n_patients
    table["method"] = pd.Categorical(table["method"], categories=order, ordered=True)
    table = table.sort_values(keys).reset_index(drop=True)
    table["method"] = table["method"].astype(str)
    rest = [c for c in table.columns if c not in CONTRACT_COLUMNS]
    return table[CONTRACT_COLUMNS + rest]


def _delong_table(test: list[SplitSweep], reference: str) -> pd.DataFrame:
    columns = ["method", "reference", "missing_rate", *TEST_COLUMNS]
    methods = test[0].methods
    if reference not in methods:
        log.warning("reference method '%s' not evaluated: no paired tests", reference)
        return pd.DataFrame(columns=columns)
    labels = test[0].labels
    cases = []
    for r, rate in enumerate(test[0].rates):
        ref_scores = _replicate_scores(test, reference, r)
        ref_auc = replicate_auc(ref_scores, labels)
        for method in [m for m in methods if m != reference]:
            scores = _replicate_scores(test, method, r)
            where = {"method": method, "reference": reference, "missing_rate": rate}
            cases.append((where, scores, ref_scores, replicate_auc(scores, labels), ref_auc))
    return paired_test_table(cases, labels, columns)


def paired_test_table(cases: list[tuple], labels: np.ndarray, columns: list[str]) -> pd.DataFrame:
    """One row per case ``(where, scores, reference scores, auc, reference auc)``: ``where``
    (with its ``missing_rate``) and the paired test, Holm-corrected across the cases at each
    rate. The run's tests and the comparison's alike."""
    rows = []  # p_holm (NaN) is filled in below, once every test at a rate is known
    for where, scores, reference, auc, auc_reference in cases:
        if scores.ndim == 3:  # [R, n, K]: K classes
            test = MC.paired_macro_test(scores, reference, labels)
        else:
            test = M.paired_auc_test(scores, reference, labels)
        result = (test.difference, test.z, test.p_value, np.nan, test.test, test.p_floor)
        rows.append({**where, **dict(zip(TEST_COLUMNS, (auc, auc_reference, *result)))})
    table = pd.DataFrame(rows, columns=columns)
    if len(table):
        by_rate = table.groupby("missing_rate")["p_value"]
        table["p_holm"] = by_rate.transform(lambda p: M.holm(p.to_numpy()))
    return table


def replicate_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The AUC of ``[R, n]`` scores (K classes: the macro AUC of ``[R, n, K]``) averaged over
    the replicates."""
    return MC.mean_macro_auc(scores, labels) if scores.ndim == 3 else M.mean_auc(scores, labels)


def _replicate_scores(test: list[SplitSweep], method: str, r: int) -> np.ndarray:
    """``[folds x seeds, n]``: the method's test scores at rate index ``r`` in every replicate."""
    return np.concatenate([t.probs[method][:, r] for t in test])


# --- K classes ----------------------------------------------------------------------------------


def summarize_classes(test: list[SplitSweep], cfg: EvaluationConfig) -> EvaluationTables:
    """Every table for a K-class label (K > 2): the macro one-vs-rest AUC (``auc``) with each
    class's (``auc_<k>``), stratified bootstrap CIs, the argmax decision's metrics and paired
    bootstrap tests against the reference, Holm-corrected at each rate."""
    first = test[0]
    labels, n_classes = first.labels, first.n_classes
    by_seed = pd.DataFrame([row for t in test for row in _class_replicate_rows(t)])
    ci_rows = []
    for method in first.methods:
        # per class [R, n_k, n - n_k], averaged over folds and mask seeds
        per_fold = [MC.class_kernels(t.probs[method], labels) for t in test]
        kernels = [sum(f[k].mean(axis=0) for f in per_fold) / len(test) for k in range(n_classes)]
        per_class = np.stack([k.mean(axis=(-2, -1)) for k in kernels], axis=-1)  # [R, K]
        low = high = np.full(len(first.rates), np.nan)
        if cfg.bootstrap:
            draws = MC.class_weights_draws(labels, cfg.bootstrap, seed=0)
            boot = MC.bootstrap_macro_auc(kernels, labels, draws)  # [R, n_boot]
            low, high = M.percentile_ci(boot, cfg.ci_level)
        for r, rate in enumerate(first.rates):
            ci_rows.append(
                {"method": method, "missing_rate": rate, "auc_ci_low": low[r]}
                | {"auc_ci_high": high[r]}
                | {f"auc_{k}": a for k, a in enumerate(per_class[r])}
            )
    metrics = _aggregate(by_seed, pd.DataFrame(ci_rows), n_patients=len(first.patient_ids))
    for k in range(n_classes):
        metrics[f"n_class_{k}"] = int(np.sum(labels == k))
    metrics["auc_ci_method"] = "bootstrap" if cfg.bootstrap else ""
    tests = _delong_table(test, cfg.reference_method)
    return EvaluationTables(metrics=metrics, by_seed=by_seed, delong=tests)


def _class_replicate_rows(test: SplitSweep) -> list[dict[str, object]]:
    rows = []
    for method, probs in test.probs.items():  # [S, R, n, K]
        aucs, _ = MC.macro_auc(probs, test.labels)  # [S, R]
        for s, seed in enumerate(test.seeds):
            for r, rate in enumerate(test.rates):
                rows.append(
                    {
                        "method": method,
                        "missing_rate": rate,
                        "fold": test.fold,
                        "mask_seed": int(seed),
                        "auc": aucs[s, r],
                        **MC.decision_metrics(test.labels, probs[s, r]),
                        "threshold": np.nan,  # the argmax decides
                        "missing_share": float(test.masks[s, r].mean()),
                    }
                )
    return rows
