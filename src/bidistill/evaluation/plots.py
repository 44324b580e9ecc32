"""The report's figures, each a PNG panel written atomically, readable at the report's narrowest
width and on paper; curves over mask seeds are averaged, as the tables' AUCs are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from bidistill._io import atomic_path  # noqa: E402
from bidistill.evaluation.missing import SplitSweep  # noqa: E402

ROC_RATES = (0.0, 0.8, 1.0)
DPI = 150  # 630 px for a 4.2 in panel: sharp when the report shows it at 300-420 px
PANEL = (4.2, 4.2)  # inches
WIDE = (7.5, 4.2)
STYLE = {
    "font.size": 11,
    "axes.titlesize": 11.5,
    "axes.labelsize": 11,
    "legend.fontsize": 10,
    "legend.title_fontsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
}

# One colour per registered method, the same in every report (Okabe-Ito first: readable by
# colour-blind readers). Entries with their own `label` get a colour from the label's hash.
METHOD_COLOURS = {
    "bd": "#D55E00",
    "wsi-only": "#0072B2",
    "clinical-only": "#009E73",
    "fusion-mean": "#E69F00",
    "moddrop": "#56B4E9",
    "fusion-zero": "#CC79A7",
    "clinical-linear": "#66A61E",
    "switch": "#A6761D",
    "kd": "#666666",
    "ae-impute": "#8C564B",
    "ensemble": "#7570B3",
    "shaspec": "#17BECF",
}
_EXTRA_COLOURS = ("#1B9E77", "#E7298A", "#7F3C8D", "#11A579", "#3969AC", "#F2B701", "#E73F74")


def method_colour(method: str) -> str:
    """The method's colour: fixed for registry names, derived from the name otherwise."""
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    digest = hashlib.blake2b(method.encode(), digest_size=2).digest()
    return _EXTRA_COLOURS[int.from_bytes(digest, "little") % len(_EXTRA_COLOURS)]


def plot_auc_vs_missing(metrics: pd.DataFrame, path: Path, *, reference: str = "bd") -> Path:
    """AUC against the share of test patients without clinical data, one line per method (the
    reference drawn thicker)."""
    lines = [
        (
            metrics[metrics["method"] == method],
            {
                "color": method_colour(method),
                "lw": 2.6 if method == reference else 1.6,
                "marker": "o",
                "label": method,
                "zorder": 3 if method == reference else 2,
            },
        )
        for method in dict.fromkeys(metrics["method"])
    ]
    return plot_auc_lines(lines, np.sort(metrics["missing_rate"].unique()), path, legend="method")


def plot_auc_lines(
    lines: list[tuple[pd.DataFrame, dict]], rates: np.ndarray, path: Path, *, legend: str
) -> Path:
    """One line of AUCs against the missing rate per ``(rows, matplotlib style)``, with the 95%
    CIs as error bars, each line's nudged sideways so that they do not overlap (a shaded band
    per line would merge into one smear)."""
    step = np.min(np.diff(rates)) if len(rates) > 1 else 1.0
    offsets = (np.arange(len(lines)) - (len(lines) - 1) / 2) * step * 0.6 / max(len(lines), 1)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=WIDE, layout="constrained")
        for (rows, style), offset in zip(lines, offsets):
            rows = rows.sort_values("missing_rate")
            auc = rows["auc"].to_numpy(float)
            err = np.vstack([auc - rows["auc_ci_low"], rows["auc_ci_high"] - auc])
            ax.errorbar(
                rows["missing_rate"].to_numpy(float) + offset,
                auc,
                yerr=None if np.isnan(err).all() else err,
                ms=4.5,
                capsize=2.5,
                elinewidth=1.0,
                **style,
            )
        ax.set_xticks(rates, [f"{r:.0%}" for r in rates])
        ax.set(xlabel="test patients without clinical data (r)", ylabel="AUC (bars: 95% CI)")
        ax.axhline(0.5, color="#999999", lw=0.8, ls=":")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, title=legend)
    return save_figure(fig, path)


FPR_GRID = np.linspace(0.0, 1.0, 201)


def _replicates(sweeps: Sequence[SplitSweep], method: str, rate_index: int) -> list[np.ndarray]:
    """The method's probabilities at one rate in every (fold, mask seed) replicate."""
    return [s.probs[method][k, rate_index] for s in sweeps for k in range(len(s.seeds))]


def mean_roc(labels: np.ndarray, replicates: Sequence[np.ndarray]) -> np.ndarray:
    """The mean true-positive rate over replicates at each false-positive rate of
    ``FPR_GRID`` (vertical averaging), starting at 0."""
    curves = []
    for probs in replicates:
        fpr, tpr, _ = roc_curve(labels, probs)
        curves.append(np.interp(FPR_GRID, fpr, tpr))
    mean = np.mean(curves, axis=0)
    mean[0] = 0.0
    return mean


def roc_rate_indices(rates: np.ndarray) -> list[int]:
    """The evaluated rates nearest to 0, 0.8 and 1 (each once)."""
    return sorted({int(np.argmin(np.abs(rates - r))) for r in ROC_RATES})


def plot_roc(
    sweeps: Sequence[SplitSweep], rate_index: int, path: Path, *, aucs: dict[str, float]
) -> Path:
    """ROC curves of every method at one missing rate, averaged over every replicate of each
    fold's test sweep; ``aucs`` (the metrics table's, at that rate) go in the legend."""
    first = sweeps[0]
    rate = float(first.rates[rate_index])
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=PANEL, layout="constrained")
        for method in first.methods:
            tpr = mean_roc(first.labels, _replicates(sweeps, method, rate_index))
            ax.plot(
                FPR_GRID,
                tpr,
                color=method_colour(method),
                lw=1.8,
                label=f"{method}  {aucs.get(method, float('nan')):.3f}",
            )
        ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
        ax.set(xlim=(0, 1), ylim=(0, 1.005), aspect="equal")
        ax.set(xlabel="1 − specificity", ylabel="sensitivity")
        ax.set_title(f"r = {rate:g}: {rate:.0%} without clinical data", loc="left")
        ax.legend(loc="lower right", title="method  AUC", frameon=True, framealpha=0.9)
    return save_figure(fig, path)


def plot_class_roc(
    sweeps: Sequence[SplitSweep],
    rate_index: int,
    path: Path,
    *,
    class_names: Sequence[str],
    aucs: dict[str, Sequence[float]],
) -> Path:
    """A K-class label's one-vs-rest ROC curves at one missing rate: a panel per class, every
    method in each, averaged over the replicates; ``aucs``: each method's per-class AUCs."""
    first = sweeps[0]
    rate = float(first.rates[rate_index])
    n_classes = len(class_names)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            1, n_classes, figsize=(PANEL[0] * 0.85 * n_classes, PANEL[1]), layout="constrained"
        )
        for k, ax in enumerate(np.atleast_1d(axes)):
            for method in first.methods:
                scores = [p[..., k] for p in _replicates(sweeps, method, rate_index)]
                tpr = mean_roc(first.labels == k, scores)
                auc = aucs.get(method, [float("nan")] * n_classes)[k]
                ax.plot(
                    FPR_GRID, tpr, color=method_colour(method), lw=1.6, label=f"{method}  {auc:.3f}"
                )
            ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
            ax.set(xlim=(0, 1), ylim=(0, 1.005), aspect="equal", xlabel="1 − specificity")
            ax.set_title(f"{class_names[k]} vs rest", loc="left")
            ax.legend(loc="lower right", title="method  AUC", frameon=True, framealpha=0.9)
        np.atleast_1d(axes)[0].set(ylabel="sensitivity")
        fig.suptitle(f"r = {rate:g}: {rate:.0%} without clinical data", x=0.01, ha="left")
    return save_figure(fig, path)


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int):
    """Per equal-width bin of predicted probability: mean prediction, observed share of
    positives and count (bins without patients left out)."""
    which = np.clip((probs * bins).astype(int), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    used = counts > 0
    predicted = np.bincount(which, weights=probs, minlength=bins)[used] / counts[used]
    observed = np.bincount(which, weights=labels, minlength=bins)[used] / counts[used]
    return predicted, observed, counts


def plot_calibration(
    sweeps: Sequence[SplitSweep], rate_index: int, path: Path, *, bins: int = 10
) -> Path:
    """Reliability curve per method at one rate, replicates pooled, with the patients per bin
    (per replicate) underneath."""
    first = sweeps[0]
    rate = float(first.rates[rate_index])
    edges = np.linspace(0, 1, bins + 1)
    with plt.rc_context(STYLE):
        fig, (ax, hist) = plt.subplots(
            2,
            1,
            figsize=(PANEL[0], PANEL[1] + 1.1),
            layout="constrained",
            sharex=True,
            gridspec_kw={"height_ratios": [3.2, 1]},
        )
        for method in first.methods:
            replicates = _replicates(sweeps, method, rate_index)
            labels = np.concatenate([s.labels for s in sweeps for _ in s.seeds])
            predicted, observed, counts = reliability(labels, np.concatenate(replicates), bins)
            colour = method_colour(method)
            ax.plot(predicted, observed, marker="o", ms=3.5, color=colour, lw=1.5, label=method)
            hist.stairs(counts / len(replicates), edges, color=colour, lw=1.3)
        ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
        # A margin so that points at 0 or 1 are drawn whole inside the frame.
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.03, 1.03), ylabel="observed share positive")
        ax.set_title(f"r = {rate:g}: {rate:.0%} without clinical data", loc="left")
        ax.legend(loc="upper left", frameon=True, framealpha=0.9)
        hist.set(xlabel="predicted probability (bins of 0.1)", ylabel="patients")
    return save_figure(fig, path)


def plot_training(
    logs: dict[str, pd.DataFrame],
    path: Path,
    *,
    column: str,
    label: str,
    best: dict[str, list[int]] | None = None,
) -> Path:
    """One training-log column per method against the epoch (the log's rows, counted from 1
    across stages); a dot marks each kept epoch given in ``best``."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=PANEL, layout="constrained")
        for method, frame in logs.items():
            if column not in frame:
                continue
            values = frame[column].to_numpy(float)
            epochs = np.arange(1, len(values) + 1)
            colour = method_colour(method)
            ax.plot(epochs, values, color=colour, lw=1.5, label=method)
            for epoch in (best or {}).get(method, []):
                ax.plot(epoch, values[epoch - 1], "o", color=colour, ms=5)
        ax.set(xlabel="epoch", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", frameon=True, framealpha=0.9)
    return save_figure(fig, path)


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Write a figure as PNG (atomically) and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    return path
