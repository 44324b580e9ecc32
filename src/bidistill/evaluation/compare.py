"""`bidistill compare`: the AUCs of several runs side by side, with paired tests between runs.

Each run directory must have been evaluated (``metrics.csv`` and the long ``predictions.csv``),
and that evaluation must be current: a run whose predictions or evaluation settings changed since
(``run.json``, see ``freshness``) is refused with the command that evaluates it again. The table
joins the runs' ``metrics.csv`` on the missing rates every run was evaluated at (the others are
left out, and the comparison says so). Where a later run has exactly the test patients (and
labels) of the first run, each of its methods is tested against the same method of the first run
at every missing rate, with the paired test a run uses for its own methods (DeLong's, or the
permutation test on small test sets; ``metrics.paired_auc_test``) over the (fold, mask seed)
replicates both runs have, and the p-values are Holm-corrected across the tests at each rate.
Runs with other test patients are shown but not tested (their CIs are the only comparison).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bidistill._io import write_csv
from bidistill.evaluation import metrics as M
from bidistill.evaluation.freshness import evaluation_check
from bidistill.evaluation.inputs import PredictionsError
from bidistill.runs.rundir import RunDir

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
    "test",
    "p_floor",
]
# What `bidistill run` leaves in a run folder, for the message about a folder that is not one.
RUN_FOLDER = (
    "a run folder holds config.yaml, splits.json, one <method>/predictions.csv per method and, "
    "once evaluated, metrics.csv and predictions.csv"
)


@dataclass
class Comparison:
    runs: list[str]  # labels, in the order given (the first is the reference)
    table: pd.DataFrame  # run, method, missing_rate, auc, auc_ci_low, auc_ci_high, ...
    delong: pd.DataFrame  # DELONG_COLUMNS
    unpaired: dict[str, str] = field(default_factory=dict)  # run -> why it was not tested
    left_out: dict[float, list[str]] = field(default_factory=dict)  # rate -> runs that have it
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
        PredictionsError: a folder that is not an evaluated run, a run whose evaluation is out of
            date, duplicate labels, no method left after ``methods``, or no missing rate that
            every run was evaluated at.
    """
    runs = [Path(r) for r in runs]
    labels = list(labels) if labels else run_labels(runs)
    if len(set(labels)) != len(labels):
        raise PredictionsError(f"two runs share a label ({labels}); give --label for each run")
    frames, predictions = [], {}
    for run, label in zip(runs, labels):
        check_evaluated_run(run)
        frame = pd.read_csv(RunDir(run).metrics)
        if methods:
            frame = frame[frame["method"].isin(methods)]
        frames.append(frame.assign(run=label))
        predictions[label] = pd.read_csv(RunDir(run).predictions, dtype={"patient": str})
    table = pd.concat(frames, ignore_index=True)
    if table.empty:
        raise PredictionsError(f"none of the methods {list(methods or [])} is in these runs")
    table, left_out = _common_rates(table, labels)
    first = ["run", "method", "missing_rate"]
    table = table[first + [c for c in table.columns if c not in first]]
    delong, unpaired = _paired_tests(labels, table, predictions)
    result = Comparison(
        runs=labels, table=table, delong=delong, unpaired=unpaired, left_out=left_out
    )
    out_dir = Path(out_dir)
    result.table_path = out_dir / "compare.csv"
    result.delong_path = out_dir / "compare_delong.csv"
    write_csv(result.table_path, table)
    write_csv(result.delong_path, delong)
    result.figure_path = plot_comparison(table, out_dir / "compare.png", runs=labels)
    return result


def check_evaluated_run(run: Path) -> None:
    """Refuse a folder that is not a run, a run not evaluated yet, and a run whose evaluation is
    out of date (its ``metrics.csv`` would show numbers of predictions that are gone).

    Raises:
        PredictionsError: naming the folder, what is wrong, and the command that fixes it.
    """
    evaluate = f"bidistill evaluate {shlex.quote(str(run))}"
    if not run.is_dir():
        raise PredictionsError(f"{run}: no such folder; give the run folders to compare")
    evaluated = RunDir(run).metrics.is_file() and RunDir(run).predictions.is_file()
    if not evaluated:
        if _has_method_folders(run):
            raise PredictionsError(f"{run}: not evaluated yet (no metrics.csv); run: {evaluate}")
        raise PredictionsError(f"{run} is not a run folder: {RUN_FOLDER}. {_run_hint(run)}")
    check = evaluation_check(run)
    if check is not None and not check:
        raise PredictionsError(
            f"{run}: metrics.csv is out of date ({check.reason} since it was evaluated); "
            f"evaluate the run again: {evaluate}"
        )


def _has_method_folders(folder: Path) -> bool:
    """Whether ``folder`` holds a trained method's ``<method>/predictions.csv`` (not a whole
    run's, which sits beside its ``config.yaml``)."""
    return any(not RunDir(m.path).config.is_file() for m in RunDir(folder).predicted_methods())


def _run_hint(folder: Path) -> str:
    """Evaluated runs inside ``folder`` to compare instead, else how to make a run."""
    inside = sorted(p for p in folder.iterdir() if RunDir(p).metrics.is_file())
    if len(inside) >= 2:
        shown = " ".join(shlex.quote(str(p)) for p in inside[:4])
        return f"It holds runs; compare those: bidistill compare {shown}"
    return "Make a run with: bidistill run CONFIG --out DIR"


def _common_rates(
    table: pd.DataFrame, labels: list[str]
) -> tuple[pd.DataFrame, dict[float, list[str]]]:
    """The rows at the missing rates every run has, and the rates left out (with the runs that
    have them).

    Raises:
        PredictionsError: the runs share no missing rate.
    """
    key = table["missing_rate"].round(9)
    by_run = {label: set(key[table["run"] == label]) for label in labels}
    common = set.intersection(*by_run.values())
    if not common:
        listed = "; ".join(
            f"{label}: {', '.join(f'{r:g}' for r in sorted(rates))}"
            for label, rates in by_run.items()
        )
        raise PredictionsError(
            f"the runs share no missing rate ({listed}); set the same evaluation.missing_rates "
            "in each run's config.yaml and evaluate them again with `bidistill evaluate RUN`"
        )
    left_out = {
        float(rate): [label for label, rates in by_run.items() if rate in rates]
        for rate in sorted(set.union(*by_run.values()) - common)
    }
    return table[key.isin(common)].reset_index(drop=True), left_out


def _test_patients(frame: pd.DataFrame) -> pd.Series:
    """Label per test patient (the long predictions hold test patients only)."""
    return frame.drop_duplicates("patient").set_index("patient")["label"].sort_index()


def _paired_tests(labels: list[str], table: pd.DataFrame, predictions: dict[str, pd.DataFrame]):
    reference = labels[0]
    ref_patients = _test_patients(predictions[reference])
    rates = sorted(table["missing_rate"].unique())
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
            rows += _delong_rows(predictions, reference, label, method, ref_patients, rates)
    delong = pd.DataFrame(rows, columns=DELONG_COLUMNS)
    if len(delong):
        delong["p_holm"] = delong.groupby("missing_rate")["p_value"].transform(
            lambda p: M.holm(p.to_numpy())
        )
    return delong, unpaired


def _replicates(frame: pd.DataFrame, method: str, rate: float, patients: pd.Series):
    """One run's scores of ``method`` at ``rate``: ``{(fold, mask_seed): [n]}`` in the order of
    ``patients``."""
    rows = frame[(frame["method"] == method) & np.isclose(frame["missing_rate"], rate)]
    keys = [c for c in ("fold", "mask_seed") if c in rows]
    return {
        key: replicate.set_index("patient")["probability"].reindex(patients.index).to_numpy()
        for key, replicate in rows.groupby(keys)
    }


def _mean_auc(replicates: dict, labels: np.ndarray) -> float:
    return float(M.pair_kernel(np.stack(list(replicates.values())), labels).mean())


def _delong_rows(
    predictions, reference: str, label: str, method: str, patients: pd.Series, rates: list[float]
):
    rows = []
    labels = patients.to_numpy()
    for rate in rates:
        a = _replicates(predictions[label], method, rate, patients)
        b = _replicates(predictions[reference], method, rate, patients)
        shared = [key for key in a if key in b]
        if shared:  # the same (fold, mask seed): the same patients lose their clinical data
            scores_a, scores_b = (np.stack([x[k] for k in shared]) for x in (a, b))
        else:
            scores_a, scores_b = (np.stack(list(x.values())).mean(axis=0)[None] for x in (a, b))
        test = M.paired_auc_test(scores_a, scores_b, labels)
        rows.append(
            {
                "run": label,
                "method": method,
                "reference_run": reference,
                "missing_rate": float(rate),
                "auc": _mean_auc(a, labels),
                "auc_reference": _mean_auc(b, labels),
                "auc_difference": test.difference,
                "z": test.z,
                "p_value": test.p_value,
                "p_holm": np.nan,
                "test": test.test,
                "p_floor": test.p_floor,
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
