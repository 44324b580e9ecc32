"""The report's figures: AUC versus missing rate, ROC curves, calibration. PNG, written atomically.

ROC and calibration curves show one replicate (fold 0, the first mask seed) so that each curve is
a real classifier's; the AUC curve shows the replicate means with their bootstrap CIs.
"""

from __future__ import annotations

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
DPI = 100


def method_colors(methods: list[str]) -> dict[str, tuple]:
    """A stable colour per method, in the order the methods are listed."""
    palette = plt.get_cmap("tab10")
    return {m: palette(i % 10) for i, m in enumerate(methods)}


def plot_auc_vs_missing(metrics: pd.DataFrame, path: Path, *, reference: str = "bd") -> Path:
    """AUC against the test missing rate, one line per method with its CI band."""
    methods = list(dict.fromkeys(metrics["method"]))
    colors = method_colors(methods)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    for method in methods:
        rows = metrics[metrics["method"] == method].sort_values("missing_rate")
        width = 2.6 if method == reference else 1.5
        ax.plot(
            rows.missing_rate, rows.auc, marker="o", lw=width, color=colors[method], label=method
        )
        ax.fill_between(
            rows.missing_rate,
            rows.auc_ci_low,
            rows.auc_ci_high,
            color=colors[method],
            alpha=0.12,
            lw=0,
        )
    ax.set_xlabel("share of test patients without clinical data")
    ax.set_ylabel("AUC (mean over mask seeds, 95% CI)")
    ax.set_title("AUC versus missing clinical data")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return _save(fig, path)


def plot_roc(sweep: SplitSweep, path: Path) -> Path:
    """ROC curves of every method at missing rates 0, 0.8 and 1 (the nearest rates evaluated)."""
    rate_idx = sorted({int(np.argmin(np.abs(sweep.rates - r))) for r in ROC_RATES})
    colors = method_colors(sweep.methods)
    fig, axes = plt.subplots(
        1, len(rate_idx), figsize=(4.2 * len(rate_idx), 4.4), squeeze=False, layout="constrained"
    )
    for ax, r in zip(axes[0], rate_idx):
        for method, probs in sweep.probs.items():
            fpr, tpr, _ = roc_curve(sweep.labels, probs[0, r])
            ax.plot(fpr, tpr, color=colors[method], lw=1.4, label=method)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_title(f"missing rate {sweep.rates[r]:g}")
        ax.set_xlabel("1 − specificity")
        ax.set_aspect("equal")
    axes[0, 0].set_ylabel("sensitivity")
    axes[0, -1].legend(loc="lower right", fontsize=7)
    fig.suptitle(f"ROC on the test patients (mask seed {sweep.seeds[0]})")
    return _save(fig, path)


def plot_calibration(sweep: SplitSweep, path: Path, *, bins: int = 10) -> Path:
    """Reliability curves (mean predicted vs observed rate per bin) at rates 0 and 1."""
    rate_idx = sorted({0, len(sweep.rates) - 1})
    colors = method_colors(sweep.methods)
    fig, axes = plt.subplots(
        1, len(rate_idx), figsize=(4.6 * len(rate_idx), 4.4), squeeze=False, layout="constrained"
    )
    for ax, r in zip(axes[0], rate_idx):
        for method, probs in sweep.probs.items():
            predicted, observed = _reliability(sweep.labels, probs[0, r], bins)
            ax.plot(
                predicted, observed, marker="o", ms=3, color=colors[method], lw=1.3, label=method
            )
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="mean predicted probability",
            title=f"missing rate {sweep.rates[r]:g}",
        )
    axes[0, 0].set_ylabel("observed share of positives")
    axes[0, -1].legend(loc="upper left", fontsize=7)
    fig.suptitle("Calibration on the test patients")
    return _save(fig, path)


def _reliability(labels: np.ndarray, probs: np.ndarray, bins: int):
    which = np.clip((probs * bins).astype(int), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    used = counts > 0
    predicted = np.bincount(which, weights=probs, minlength=bins)[used] / counts[used]
    observed = np.bincount(which, weights=labels, minlength=bins)[used] / counts[used]
    return predicted, observed


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path
