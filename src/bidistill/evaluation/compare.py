"""`bidistill compare`: the AUCs of several runs side by side, with paired tests between runs.

Each run directory must have been evaluated (``metrics.csv`` and the long ``predictions.csv``).
The table joins the runs' ``metrics.csv``. Where a later run has exactly the test patients (and
labels) of the first run, each of its methods is tested against the same method of the first
run with DeLong's paired test at every missing rate: each side's structural components are
averaged over its own (fold, mask seed) replicates, as in a run's own tests, and the p-values
are Holm-corrected across the tests at each rate. Runs with other test patients are shown but
not tested (their CIs are the only comparison).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bidistill._io import write_csv
from bidistill.evaluation import metrics as M
from bidistill.evaluation.inputs import PredictionsError

DELONG_COLUMNS = [
    "run",
    "method",
    "reference_run",
    "missing_rate",
    "auc",
    "auc_reference",
    "auc_difference",
    "z",
    "p_value",
    "p_holm",
]


@dataclass
class Comparison:
    runs: list[str]  # labels, in the order given (the first is the reference)
    table: pd.DataFrame  # run, method, missing_rate, auc, auc_ci_low, auc_ci_high, ...
    delong: pd.DataFrame  # DELONG_COLUMNS
    unpaired: dict[str, str] = field(default_factory=dict)  # run -> why it was not tested
    table_path: Path | None = None
    delong_path: Path | None = None
    figure_path: Path | None = None


def run_labels(runs: Sequence[Path]) -> list[str]:
    """Folder names, or parent/name where two runs share a folder name."""
    names = [Path(r).name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(r).parent.name}/{Path(r).name}" for r in runs]


def compare_runs(
    runs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    labels: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
) -> Comparison:
    """Compare evaluated run directories and write ``compare.csv``, ``compare_delong.csv`` and
    ``compare.png`` into ``out_dir``.

    Raises:
        PredictionsError: a run without ``metrics.csv`` / ``predictions.csv``, duplicate
            labels, or no method left after ``methods``.
    """
    runs = [Path(r) for r in runs]
    labels = list(labels) if labels else run_labels(runs)
    if len(set(labels)) != len(labels):
        raise PredictionsError(f"two runs share a label ({labels}); give --label for each run")
    frames, predictions = [], {}
    for run, label in zip(runs, labels):
        metrics_path, long_path = run / "metrics.csv", run / "predictions.csv"
        if not metrics_path.is_file() or not long_path.is_file():
            raise PredictionsError(
                f"{run}: no metrics.csv or predictions.csv; evaluate it first: "
                f"bidistill evaluate {run}"
            )
        frame = pd.read_csv(metrics_path)
        if methods:
            frame = frame[frame["method"].isin(methods)]
        frames.append(frame.assign(run=label))
        predictions[label] = pd.read_csv(long_path, dtype={"patient": str})
    table = pd.concat(frames, ignore_index=True)
    if table.empty:
        raise PredictionsError(f"none of the methods {list(methods or [])} is in these runs")
    first = ["run", "method", "missing_rate"]
    table = table[first + [c for c in table.columns if c not in first]]
    delong, unpaired = _paired_tests(labels, table, predictions)
    result = Comparison(runs=labels, table=table, delong=delong, unpaired=unpaired)
    out_dir = Path(out_dir)
    result.table_path = out_dir / "compare.csv"
    result.delong_path = out_dir / "compare_delong.csv"
    write_csv(result.table_path, table)
    write_csv(result.delong_path, delong)
    result.figure_path = plot_comparison(table, out_dir / "compare.png", runs=labels)
    return result


def _test_patients(frame: pd.DataFrame) -> pd.Series:
    """Label per test patient (the long predictions hold test patients only)."""
    return frame.drop_duplicates("patient").set_index("patient")["label"].sort_index()


def _paired_tests(labels: list[str], table: pd.DataFrame, predictions: dict[str, pd.DataFrame]):
    reference = labels[0]
    ref_patients = _test_patients(predictions[reference])
    rows, unpaired = [], {}
    for label in labels[1:]:
        patients = _test_patients(predictions[label])
        if not patients.index.equals(ref_patients.index):
            unpaired[label] = f"other test patients than {reference}"
            continue
        if not patients.equals(ref_patients):
            unpaired[label] = f"other labels for the test patients of {reference}"
            continue
        shared = set(table.loc[table.run == label, "method"]) & set(
            table.loc[table.run == reference, "method"]
        )
        for method in [m for m in dict.fromkeys(table["method"]) if m in shared]:
            rows += _delong_rows(predictions, reference, label, method, ref_patients)
    delong = pd.DataFrame(rows, columns=DELONG_COLUMNS)
    if len(delong):
        delong["p_holm"] = delong.groupby("missing_rate")["p_value"].transform(
            lambda p: M.holm(p.to_numpy())
        )
    return delong, unpaired


def _components(frame: pd.DataFrame, method: str, rate: float, patients: pd.Series):
    """DeLong components of one run's method at one rate, averaged over its replicates."""
    rows = frame[(frame["method"] == method) & np.isclose(frame["missing_rate"], rate)]
    keys = [c for c in ("fold", "mask_seed") if c in rows]
    v10, v01, count = 0.0, 0.0, 0
    for _, replicate in rows.groupby(keys):
        scores = replicate.set_index("patient")["probability"].reindex(patients.index)
        comp = M.delong_components(scores.to_numpy()[None, :], patients.to_numpy())
        v10, v01, count = v10 + comp.v10, v01 + comp.v01, count + 1
    return v10 / count, v01 / count


def _delong_rows(predictions, reference: str, label: str, method: str, patients: pd.Series):
    rows = []
    rates = sorted(predictions[label].loc[lambda f: f["method"] == method, "missing_rate"].unique())
    for rate in rates:
        a = _components(predictions[label], method, rate, patients)
        b = _components(predictions[reference], method, rate, patients)
        components = M.DelongComponents(v10=np.vstack([a[0], b[0]]), v01=np.vstack([a[1], b[1]]))
        diff, z, p = M.delong_test(components, 0, 1)
        aucs = components.aucs
        rows.append(
            {
                "run": label,
                "method": method,
                "reference_run": reference,
                "missing_rate": float(rate),
                "auc": float(aucs[0]),
                "auc_reference": float(aucs[1]),
                "auc_difference": diff,
                "z": z,
                "p_value": p,
                "p_holm": np.nan,
            }
        )
    return rows


def plot_comparison(table: pd.DataFrame, path: Path, *, runs: list[str]) -> Path:
    """AUC against the missing rate for every (run, method): colour by method, line style by
    run, 95% CIs as error bars nudged apart."""
    from bidistill.evaluation import plots

    plt = plots.plt
    styles = ["-", "--", ":", "-."]
    entries = list(dict.fromkeys(zip(table["run"], table["method"])))
    rates = np.sort(table["missing_rate"].unique())
    step = np.min(np.diff(rates)) if len(rates) > 1 else 1.0
    offsets = (np.arange(len(entries)) - (len(entries) - 1) / 2) * step * 0.6 / len(entries)
    with plt.rc_context(plots.STYLE):
        fig, ax = plt.subplots(figsize=plots.WIDE, layout="constrained")
        for (run, method), offset in zip(entries, offsets):
            rows = table[(table.run == run) & (table.method == method)].sort_values("missing_rate")
            auc = rows["auc"].to_numpy(float)
            err = np.vstack([auc - rows["auc_ci_low"], rows["auc_ci_high"] - auc])
            ax.errorbar(
                rows["missing_rate"].to_numpy(float) + offset,
                auc,
                yerr=None if np.isnan(err).all() else err,
                color=plots.method_colour(method),
                ls=styles[runs.index(run) % len(styles)],
                marker="os^D"[runs.index(run) % 4],
                ms=4.5,
                lw=1.8,
                capsize=2.5,
                elinewidth=1.0,
                label=f"{run} · {method}",
            )
        ax.set_xticks(rates, [f"{r:.0%}" for r in rates])
        ax.set_xlabel("test patients without clinical data (r)")
        ax.set_ylabel("AUC (bars: 95% CI)")
        ax.axhline(0.5, color="#999999", lw=0.8, ls=":")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, title="run · method")
    return plots.save_figure(fig, path)
