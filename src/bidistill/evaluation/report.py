"""The run report's content: ``ReportInputs``, the texts and tables ``report.html``
(``report_html``) and ``report.md`` (here, figures linked from ``figures/``) share.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bidistill.config import EvaluationConfig
from bidistill.evaluation.headline import Headline, auc_text, build_headline, format_p, tests_label
from bidistill.evaluation.metrics import LARGE_SAMPLE_PER_CLASS

PROTOCOL = (
    "Clinical data is withheld per test patient at each missing rate r with nested, "
    "label-stratified masks (a patient missing at one rate is missing at every higher one; "
    "patients without clinical data in the table are missing at every rate), repeated over "
    "{seeds} mask seed(s). Each method's AUC is the mean over mask seeds{folds}; 'seed sd' is "
    "the standard deviation over mask seeds. {ci} Accuracy, F1, sensitivity and specificity "
    "use {threshold}. p-values: {test} against '{reference}' on the "
    "seed-averaged AUC, Holm-corrected across methods at each rate.{small}"
)
BOOTSTRAP_CI = (
    "The {level:.0%} CI is the percentile interval of {boot} stratified patient-level bootstrap "
    "resamples of that seed-averaged AUC."
)
NEWCOMBE_CI = (
    "The {level:.0%} CI is Newcombe's score interval (Hanley–McNeil variance) around that "
    "seed-averaged AUC."
)
TESTS = {
    "DeLong": "DeLong's paired test",
    "exact permutation": "the exact paired permutation test (every swap of the two methods' "
    "ranks per patient)",
    "permutation": "the paired permutation test (9999 random swaps of the two methods' ranks per "
    "patient)",
    "bootstrap": "the paired bootstrap test of the macro AUC (z = difference / sd of the paired "
    "resampled differences)",
}
DECISION_K = (
    "Accuracy, F1, sensitivity and specificity hold when each patient is given the class of "
    "highest probability; another population's class shares give other values. There is no "
    "calibration figure for more than two classes: the Brier score and the top-label ECE are in "
    "the metrics table."
)
MULTICLASS = (
    " With more than two classes the AUC is the macro one-vs-rest AUC (each class against the "
    "rest, averaged); F1 is the macro F1, sensitivity the mean recall over classes (the balanced "
    "accuracy) and specificity the mean per-class specificity."
)
SMALL_SAMPLE = (
    " The test set has fewer than {min} patients in a class, where DeLong's normal approximation "
    "and the bootstrap do not hold (the bootstrap CI of an AUC of 1 is [1, 1]): hence the "
    "permutation test, valid at any size, and the score interval."
)
# Columns where the best value per rate is marked: the highest, or the lowest for these two.
MARKED = ("auc", "accuracy", "balanced_accuracy", "f1", "brier", "ece")
LOWER_IS_BETTER = ("brier", "ece")
METRIC_COLUMNS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "bal. acc.",
    "f1": "F1",
    "sensitivity": "sens.",
    "specificity": "spec.",
    "brier": "Brier",
    "ece": "ECE",
    "threshold": "threshold",
}


@dataclass
class FigureGroup:
    """Figures shown together under one heading: ``(png path, alt text)`` each."""

    key: str
    title: str
    caption: str
    figures: list[tuple[Path, str]]
    wide: bool = False  # one figure the width of the page, not a grid of panels


@dataclass
class ReportInputs:
    title: str
    metrics: pd.DataFrame
    delong: pd.DataFrame
    figures: list[FigureGroup]
    reference: str
    evaluation: EvaluationConfig
    folds: int
    cohort: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    config_text: str = ""
    methods: list[Any] = field(default_factory=list)  # run_info.MethodInfo
    confusion: pd.DataFrame = field(default_factory=pd.DataFrame)
    synthetic: str | None = None  # banner text when the data or features are synthetic/random
    label: str = "the label"

    @property
    def headline(self) -> Headline:
        return build_headline(self.metrics, self.delong, self.reference)


def confusion_title(inputs: ReportInputs) -> str:
    decided = "" if inputs.headline.class_sizes else " at the chosen threshold"
    return f"Confusion matrices{decided}"


def protocol_text(inputs: ReportInputs) -> str:
    p = inputs.evaluation
    folds = (
        f" and {inputs.folds} cross-validation folds ('fold sd': standard deviation over folds)"
        if inputs.folds > 1
        else ""
    )
    rule = "Youden's J" if p.threshold == "youden" else f"fixed threshold {p.threshold}"
    classes = inputs.headline.class_sizes
    threshold = (
        "the class of highest probability (no threshold)"
        if classes
        else f"a threshold chosen on the validation patients masked the same way ({rule})"
    )
    methods = set(inputs.metrics.get("auc_ci_method", pd.Series(["bootstrap"])).dropna())
    if not p.bootstrap:
        ci = "No CI (evaluation.bootstrap: 0)."
    elif "newcombe" in methods:
        ci = NEWCOMBE_CI.format(level=p.ci_level)
    else:
        ci = BOOTSTRAP_CI.format(level=p.ci_level, boot=p.bootstrap)
    tests = list(dict.fromkeys(inputs.delong.get("test", pd.Series(["DeLong"])).dropna()))
    small = "newcombe" in methods or any(t.endswith("permutation") for t in tests)
    return PROTOCOL.format(
        seeds=p.mask_seeds,
        folds=folds,
        ci=ci,
        threshold=threshold,
        test=" / ".join(TESTS.get(t, t) for t in tests) or TESTS["DeLong"],
        reference=inputs.reference,
        small=(SMALL_SAMPLE.format(min=LARGE_SAMPLE_PER_CLASS) if small else "")
        + (MULTICLASS if classes else ""),
    )


def headline_rows(headline: Headline) -> list[dict[str, str]]:
    """One row per rate: the winner with its AUC and CI, and the test of its lead."""
    rows = []
    for r in headline.rates:
        tested = r.versus is not None
        verdict = ("yes" if r.significant else "no") if tested else "–"
        rows.append(
            {
                "r": f"{r.rate:g}",
                "highest AUC": r.leaders,
                "AUC [95% CI]": f"{auc_text(r.auc)} [{r.ci[0]:.3f}, {r.ci[1]:.3f}]",
                "tested against": r.versus or ("– (tie)" if r.tied else "–"),
                "difference": f"{r.difference:+.3f}" if tested else "–",
                "p (Holm)": format_p(r.p_holm) if tested else "–",
                "significant": "tie" if r.tied else verdict,
            }
        )
    return rows


def best_flags(metrics: pd.DataFrame) -> pd.DataFrame:
    """Boolean frame: True where a row holds the best value of its rate for a marked column."""
    flags = pd.DataFrame(False, index=metrics.index, columns=list(MARKED))
    for column in [c for c in MARKED if c in metrics]:
        grouped = metrics.groupby("missing_rate")[column]
        best = grouped.transform("min" if column in LOWER_IS_BETTER else "max")
        # As printed (three decimals): values that print the same tie and are all marked.
        printed = metrics[column].map("{:.3f}".format)
        flags[column] = (printed == best.map("{:.3f}".format)) & metrics[column].notna()
    return flags


def limitations(inputs: ReportInputs) -> list[tuple[str, str]]:
    """The model card's intended use and limitations: ``(heading, text)`` pairs."""
    h = inputs.headline
    folds = inputs.folds
    encoder = inputs.cohort.get("feature encoder", "the configured patch encoder")
    split = (
        f"{folds}-fold cross-validation with one fixed test set"
        if folds > 1
        else "one train/validation/test split"
    )
    items = [
        (
            "Intended use",
            f"Research: comparing methods that predict {inputs.label} from whole-slide image "
            "features and clinical data when the clinical data may be missing. Not a medical "
            "device, not validated for decisions about patients.",
        ),
        (
            "Data",
            f"{inputs.cohort.get('patients', 'the')} patients of one cohort table, {split}; "
            f"the test set has {h.n_patients} patients ({h.balance()}). Results on "
            "other hospitals, scanners, stains or patient populations may differ.",
        ),
        (
            "Test set size",
            f"Each AUC's 95% CI spans about ±{h.ci_half_width:.2f}; differences smaller than "
            "that between methods are not evidence that one is better."
            + (" The test set is too small for a reliable ranking." if h.unreliable else ""),
        ),
        (
            "Simulated missingness",
            "Clinical data is withheld completely at random within each label, as the protocol "
            "describes. In the clinic it is often missing for reasons related to the patient "
            "(where they were referred from, how urgent the case was), which can change how "
            "each method fares.",
        ),
        (
            ("Decision and calibration", DECISION_K)
            if h.class_sizes
            else (
                "Threshold and calibration",
                "Accuracy, sensitivity and specificity hold at the threshold chosen on the "
                "validation patients; another operating point, or another population's "
                "prevalence, gives other values. The probabilities are calibrated only as the "
                "calibration figure shows.",
            )
        ),
        (
            "Features",
            f"Every number depends on the patch encoder ('{encoder}') and the tiling; "
            "features from another encoder need a new run.",
        ),
    ]
    if inputs.synthetic:
        title, _, text = inputs.synthetic.partition(": ")
        items.insert(0, (title, text[:1].upper() + text[1:]))
    return items


def fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k} {fmt(v)}" for k, v in options.items()) or "–"


def render_markdown(inputs: ReportInputs, run_dir: Path) -> str:
    h = inputs.headline
    lines = [f"# {inputs.title}", ""]
    if inputs.synthetic:
        lines += [f"> **{inputs.synthetic}**", ""]
    lines += [f"**{h.winners()}** {h.significance()}", "", f"Compared: {h.compared()}", ""]
    lines += _md_table(pd.DataFrame(headline_rows(h)), index=False) + [""]
    if warning := h.reliability():
        lines += [f"**Warning:** {warning}", ""]
    legend = (
        "r = share of test patients whose clinical data is withheld (0: all have it). Each cell: "
        "AUC and its 95% CI; bold: highest at that rate; *: differs from "
        f"{inputs.reference} at that rate ({tests_label(inputs.delong)}, Holm-corrected "
        "p < 0.05)."
    )
    lines += ["## AUC by missing rate", "", legend, ""]
    lines += _md_table(auc_cells(inputs.metrics, h)) + [""]
    for group in inputs.figures:
        lines += [f"## {group.title}", "", group.caption, ""]
        for path, alt in group.figures:
            rel = path.relative_to(run_dir).as_posix()
            lines += [f"![{alt}]({rel})", ""]
    lines += [f"## {confusion_title(inputs)}", ""]
    if len(inputs.confusion):
        lines += _md_table(inputs.confusion.rename(columns={"missing_rate": "r"}), index=False)
    lines += ["", "## All metrics", "", "Bold: the best value at that rate.", ""]
    lines += _md_metrics(inputs.metrics)
    lines += ["", f"## Paired tests against {inputs.reference}", ""]
    lines += [
        f"AUC difference to {inputs.reference} and the Holm-corrected p-value "
        f"({tests_label(inputs.delong)}).",
        "",
    ]
    delong = delong_cells(inputs.delong)
    lines += _md_table(delong) if not delong.empty else ["No paired tests."]
    lines += ["", "## Methods and their options", ""]
    for info in inputs.methods:
        lines.append(
            f"- **{info.key}** (`{info.name}`): {options_text(info.options)}"
            + (f"; set in the config: {options_text(info.given)}" if info.given else "")
        )
    lines += ["", "## Cohort", ""]
    if inputs.cohort.get("splits"):
        lines += _md_table(pd.DataFrame(inputs.cohort["splits"]).set_index("split")) + [""]
    for column, share in inputs.cohort.get("clinical_missing", {}).items():
        lines.append(f"- {_md(column)} missing in {share:.1%} of patients")
    for key, value in inputs.cohort.items():
        if key not in ("splits", "clinical_missing"):
            lines.append(f"- {_md(key)}: {_md(fmt(value))}")
    lines += ["", "## How the numbers were made", "", protocol_text(inputs), ""]
    lines += ["## Intended use and limitations", ""]
    lines += [f"- **{head}.** {text}" for head, text in limitations(inputs)]
    lines += ["", "## Provenance", ""]
    lines += [f"- {_md(key)}: {_md(fmt(value))}" for key, value in inputs.provenance.items()]
    if inputs.config_text:
        lines += ["", "<details><summary>Resolved config</summary>", ""]
        lines += [*_md_code(inputs.config_text.rstrip(), "yaml"), "", "</details>"]
    return "\n".join(lines) + "\n"


def auc_cells(metrics: pd.DataFrame, headline: Headline) -> pd.DataFrame:
    """Method x rate table of ``AUC* [CI low, high]`` strings (Markdown)."""
    flags = best_flags(metrics)

    def cell(i: int, row: pd.Series) -> str:
        mark = "*" if (row.method, float(row.missing_rate)) in headline.significant_cells else ""
        value = f"**{row.auc:.3f}**" if flags.at[i, "auc"] else f"{row.auc:.3f}"
        ci = "" if np.isnan(row.auc_ci_low) else f" [{row.auc_ci_low:.2f}, {row.auc_ci_high:.2f}]"
        return f"{value}{mark}{ci}"

    return _by_rate(metrics, [cell(i, r) for i, r in metrics.iterrows()])


def delong_cells(delong: pd.DataFrame) -> pd.DataFrame:
    """Method x rate table of ``difference (p)`` strings."""
    if delong.empty:
        return pd.DataFrame()
    cells = [f"{r.auc_difference:+.3f} ({format_p(r.p_holm)})" for r in delong.itertuples()]
    return _by_rate(delong, cells)


def _by_rate(frame: pd.DataFrame, cells: list[str]) -> pd.DataFrame:
    """``cells`` (one per row of ``frame``) as a method x rate table, methods in table order."""
    wide = frame.assign(cell=cells).pivot(index="method", columns="missing_rate", values="cell")
    wide = wide.loc[list(dict.fromkeys(frame["method"]))]
    wide.columns = [f"r={c:g}" for c in wide.columns]
    return wide


def metric_groups(metrics: pd.DataFrame):
    """The full metrics table's header and rows by rate: ``(rate, [(method, [(text, best)])])``."""
    flags = best_flags(metrics)
    folds = metrics.get("n_folds", pd.Series([1])).max() > 1
    # K classes decide by the highest probability: no threshold column
    columns = [c for c in METRIC_COLUMNS if c != "threshold" or metrics[c].notna().any()]
    groups = []
    for rate, rows in metrics.groupby("missing_rate", sort=True):
        out = []
        for i, r in rows.iterrows():
            cells = [
                (f"{r.auc:.3f}", bool(flags.at[i, "auc"])),
                (f"{r.auc_ci_low:.2f}–{r.auc_ci_high:.2f}", False),
                (f"{r.auc_std:.3f}", False),
            ]
            cells += [(f"{r.auc_fold_std:.3f}", False)] if folds else []
            for column in columns:
                best = bool(flags.at[i, column]) if column in MARKED else False
                cells.append((f"{r[column]:.3f}", best))
            out.append((str(r.method), cells))
        groups.append((float(rate), out))
    header = ["AUC", "95% CI", "seed sd"] + (["fold sd"] if folds else [])
    return header + [METRIC_COLUMNS[c] for c in columns], groups


def _md_metrics(metrics: pd.DataFrame) -> list[str]:
    header, groups = metric_groups(metrics)
    lines = ["| r | method | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 2)]
    for rate, rows in groups:
        for method, cells in rows:
            texts = [f"**{v}**" if best else v for v, best in cells]
            lines.append(f"| {rate:g} | {method} | " + " | ".join(texts) + " |")
    return lines


def _md_table(frame: pd.DataFrame, *, index: bool = True) -> list[str]:
    head = ([frame.index.name or ""] if index else []) + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(_md(h) for h in head) + " |", "|" + "---|" * len(head)]
    for key, row in frame.iterrows():
        cells = ([str(key)] if index else []) + [fmt(v) for v in row]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return lines


def _md(text: object) -> str:
    """Text from the data (column names, values) as inert Markdown: HTML is escaped (a column
    named ``<script>`` must not become markup), and so are table pipes and code ticks."""
    escaped = html.escape(str(text), quote=False)
    return escaped.replace("|", "\\|").replace("`", "\\`").replace("\n", " ")


def _md_code(text: str, language: str) -> list[str]:
    """A fenced code block (inert in Markdown) whose fence is longer than any run of
    backticks in ``text``, so the text cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + language, text, fence]
