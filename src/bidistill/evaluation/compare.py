"""`bidistill compare`: the AUCs of several evaluated, current runs side by side, with paired
tests of each method against the same method of the first run (docs/internal-interfaces.md).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bidistill._io import write_csv
from bidistill.evaluation import plots
from bidistill.evaluation.freshness import evaluation_check
from bidistill.evaluation.inputs import PredictionsError
from bidistill.evaluation.summary import TEST_COLUMNS, paired_test_table, replicate_auc
from bidistill.runs.rundir import RunDir

DELONG_COLUMNS = ["run", "method", "reference_run", "missing_rate", *TEST_COLUMNS]


@dataclass
class Comparison:
    runs: list[str]  # labels, in the order given (the first is the reference)
    table: pd.DataFrame  # run, method, missing_rate, auc, auc_ci_low, auc_ci_high, ...
    delong: pd.DataFrame  # DELONG_COLUMNS
    unpaired: dict[str, str]  # run -> why it was not tested
    left_out: dict[float, list[str]]  # rate -> runs that have it
    out_dir: Path

    table_path = property(lambda self: self.out_dir / "compare.csv")
    delong_path = property(lambda self: self.out_dir / "compare_delong.csv")
    figure_path = property(lambda self: self.out_dir / "compare.png")


def compare_runs(
    runs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    labels: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
) -> Comparison:
    """Compare evaluated run directories and write ``compare.csv``, ``compare_delong.csv`` and
    ``compare.png`` into ``out_dir``; ``PredictionsError`` for duplicate labels, no method left
    after ``methods`` or no missing rate every run has."""
    runs = [Path(r) for r in runs]
    names = [r.name for r in runs]
    if not labels:  # folder names, or parent/name where two runs share a folder name
        unique = len(set(names)) == len(names)
        labels = names if unique else [f"{r.parent.name}/{r.name}" for r in runs]
    labels = list(labels)
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
    result = Comparison(labels, table, delong, unpaired, left_out, Path(out_dir))
    write_csv(result.table_path, table)
    write_csv(result.delong_path, delong)
    plot_comparison(table, result.figure_path, runs=labels)
    return result


def check_evaluated_run(run: Path) -> None:
    """``PredictionsError`` for a folder that is not a run, a run not evaluated yet, and a run
    whose evaluation is out of date (it would show numbers of predictions that are gone)."""
    evaluate = f"bidistill evaluate {shlex.quote(str(run))}"
    if not run.is_dir():
        raise PredictionsError(f"{run}: no such folder; give the run folders to compare")
    folder = RunDir(run)
    metrics, predictions = folder.metrics.name, folder.predictions.name
    if not (folder.metrics.is_file() and folder.predictions.is_file()):
        if _has_method_folders(run):
            raise PredictionsError(f"{run}: not evaluated yet (no {metrics}); run: {evaluate}")
        raise PredictionsError(
            f"{run} is not a run folder: a run folder holds {folder.config.name}, "
            f"{folder.splits.name}, one <method>/{predictions} per method and, once evaluated, "
            f"{metrics} and {predictions}. {_run_hint(run)}"
        )
    check = evaluation_check(run)
    if check is not None and not check:
        raise PredictionsError(
            f"{run}: {metrics} is out of date ({check.reason} since it was evaluated); "
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
    have them); ``PredictionsError`` when there is none."""
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
    cases, unpaired = [], {}
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
            cases += _test_cases(predictions, reference, label, method, ref_patients, rates)
    return paired_test_table(cases, ref_patients.to_numpy(), DELONG_COLUMNS), unpaired


def _replicates(frame: pd.DataFrame, method: str, rate: float, patients: pd.Series):
    """One run's scores of ``method`` at ``rate``: ``{(fold, mask_seed): [n]}`` (K classes:
    ``[n, K]``) in the order of ``patients``."""
    rows = frame[(frame["method"] == method) & np.isclose(frame["missing_rate"], rate)]
    keys = [c for c in ("fold", "mask_seed") if c in rows]
    binary = "probability" in rows.columns
    columns = ["probability"] if binary else [c for c in rows if c.startswith("probability_")]
    scores = {
        key: replicate.set_index("patient")[columns].reindex(patients.index).to_numpy()
        for key, replicate in rows.groupby(keys)
    }
    return {key: s[:, 0] for key, s in scores.items()} if binary else scores


def _test_cases(
    predictions, reference: str, label: str, method: str, patients: pd.Series, rates: list[float]
) -> list[tuple]:
    """The ``paired_test_table`` case of ``method`` in run ``label`` against the reference run
    at each rate."""
    cases = []
    labels = patients.to_numpy()
    for rate in rates:
        a = _replicates(predictions[label], method, rate, patients)
        b = _replicates(predictions[reference], method, rate, patients)
        shared = [key for key in a if key in b]
        if shared:  # the same (fold, mask seed): the same patients lose their clinical data
            scores_a, scores_b = (np.stack([x[k] for k in shared]) for x in (a, b))
        else:
            scores_a, scores_b = (np.stack(list(x.values())).mean(axis=0)[None] for x in (a, b))
        auc_a, auc_b = (replicate_auc(np.stack(list(x.values())), labels) for x in (a, b))
        where = {"run": label, "method": method, "reference_run": reference, "missing_rate": rate}
        cases.append((where, scores_a, scores_b, auc_a, auc_b))
    return cases


def plot_comparison(table: pd.DataFrame, path: Path, *, runs: list[str]) -> Path:
    """AUC against the missing rate for every (run, method): colour by method, line style and
    marker by run."""
    lines = []
    for (run, method), rows in table.groupby(["run", "method"], sort=False):
        style = {
            "color": plots.method_colour(method),
            "ls": ["-", "--", ":", "-."][runs.index(run) % 4],
            "marker": "os^D"[runs.index(run) % 4],
            "lw": 1.8,
            "label": f"{run} · {method}",
        }
        lines.append((rows, style))
    rates = np.sort(table["missing_rate"].unique())
    return plots.plot_auc_lines(lines, rates, path, legend="run · method")
