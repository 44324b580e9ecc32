"""The run report: a self-contained ``report.html`` (figures embedded, opens offline) and
``report.md`` (figures linked from ``figures/``), built from the evaluation tables.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bidistill._io import write_text

PROTOCOL = (
    "Clinical data is withheld per test patient at each missing rate with nested, "
    "label-stratified masks (a patient missing at one rate is missing at every higher one; "
    "patients without clinical data in the table are missing at every rate), repeated over "
    "{seeds} mask seed(s). Each method's AUC is the mean over mask seeds{folds}; ± is the standard "
    "deviation over mask seeds. The 95% CI is the percentile interval of {boot} stratified "
    "patient-level bootstrap resamples of that seed-averaged AUC. Accuracy, F1, sensitivity and "
    "specificity use a threshold chosen on the validation patients masked the same way "
    "({threshold}). p-values: DeLong's paired test against '{reference}' on the seed-averaged "
    "AUC, Holm-corrected across methods at each rate."
)
# Columns where the best value per rate is marked, and whether higher is better.
MARKED = {
    "auc": True,
    "accuracy": True,
    "balanced_accuracy": True,
    "f1": True,
    "brier": False,
    "ece": False,
}
FIGURE_TITLES = {
    "auc_vs_missing": "AUC versus missing rate",
    "roc": "ROC curves",
    "calibration": "Calibration",
}


@dataclass
class ReportInputs:
    title: str
    metrics: pd.DataFrame
    delong: pd.DataFrame
    figures: dict[str, Path]  # name -> PNG path inside the run directory
    reference: str
    protocol: dict[str, Any]  # seeds, folds, bootstrap, threshold
    cohort: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    config_text: str = ""


def write_report(run_dir: Path, inputs: ReportInputs) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into ``run_dir``; returns their paths."""
    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    write_text(html_path, render_html(inputs))
    write_text(md_path, render_markdown(inputs, run_dir))
    return html_path, md_path


def auc_cells(metrics: pd.DataFrame) -> pd.DataFrame:
    """Method x rate table of ``AUC [CI low, high]`` strings (the headline table)."""

    def cell(row: pd.Series) -> str:
        ci = "" if np.isnan(row.auc_ci_low) else f" [{row.auc_ci_low:.3f}, {row.auc_ci_high:.3f}]"
        return f"{row.auc:.3f}{ci}"

    table = metrics.assign(cell=metrics.apply(cell, axis=1))
    wide = table.pivot(index="method", columns="missing_rate", values="cell")
    wide = wide.loc[list(dict.fromkeys(metrics["method"]))]
    wide.columns = [f"r={c:g}" for c in wide.columns]
    return wide


def _protocol_text(inputs: ReportInputs) -> str:
    p = inputs.protocol
    folds = (
        f" and {p['folds']} cross-validation folds (± std over folds shown as 'fold sd')"
        if (p.get("folds", 1) > 1)
        else ""
    )
    threshold = "Youden's J" if p["threshold"] == "youden" else f"fixed threshold {p['threshold']}"
    return PROTOCOL.format(
        seeds=p["seeds"],
        folds=folds,
        boot=p["bootstrap"],
        threshold=threshold,
        reference=inputs.reference,
    )


def _best_flags(metrics: pd.DataFrame) -> pd.DataFrame:
    """Boolean frame: True where a row holds the best value of its rate for a marked column."""
    flags = pd.DataFrame(False, index=metrics.index, columns=list(MARKED))
    for column, higher in MARKED.items():
        if column not in metrics:
            continue
        grouped = metrics.groupby("missing_rate")[column]
        best = grouped.transform("max" if higher else "min")
        flags[column] = np.isclose(metrics[column], best) & metrics[column].notna()
    return flags


def _metric_rows(metrics: pd.DataFrame) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    flags = _best_flags(metrics)
    folds = metrics.get("n_folds", pd.Series([1])).max() > 1
    header = ["rate", "method", "AUC", "95% CI", "± seed sd"]
    header += ["fold sd"] if folds else []
    header += ["accuracy", "bal. acc.", "F1", "sens.", "spec.", "Brier", "ECE", "threshold", "n"]
    rows = []
    for i, r in metrics.iterrows():
        row = [
            (f"{r.missing_rate:g}", False),
            (r.method, False),
            (f"{r.auc:.3f}", flags.at[i, "auc"]),
            (f"[{r.auc_ci_low:.3f}, {r.auc_ci_high:.3f}]", False),
            (f"{r.auc_std:.3f}", False),
        ]
        row += [(f"{r.auc_fold_std:.3f}", False)] if folds else []
        for column in (
            "accuracy",
            "balanced_accuracy",
            "f1",
            "sensitivity",
            "specificity",
            "brier",
            "ece",
            "threshold",
        ):
            row.append(
                (f"{r[column]:.3f}", bool(flags.at[i, column]) if column in MARKED else False)
            )
        row.append((str(int(r.n_patients)), False))
        rows.append(row)
    return header, rows


def _delong_wide(delong: pd.DataFrame) -> pd.DataFrame:
    if delong.empty:
        return pd.DataFrame()

    def cell(row: pd.Series) -> str:
        return f"{row.auc_difference:+.3f} (p={row.p_holm:.3g})"

    wide = delong.assign(cell=delong.apply(cell, axis=1)).pivot(
        index="method", columns="missing_rate", values="cell"
    )
    wide = wide.loc[list(dict.fromkeys(delong["method"]))]
    wide.columns = [f"r={c:g}" for c in wide.columns]
    return wide


# --- HTML ---------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:right}
th{background:#f4f4f4}td:nth-child(2),td:first-child{text-align:left}
td.best{font-weight:700;background:#e8f4e8}
img{max-width:100%;display:block;margin:.6em 0}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em}
.note{color:#555;font-size:.9em}
"""


def render_html(inputs: ReportInputs) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(inputs.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(inputs.title)}</h1>",
        *_html_warning(inputs.cohort.get("warning")),
        f"<p class='note'>{e(_protocol_text(inputs))}</p>",
        "<h2>AUC by missing rate</h2>",
        _html_frame(auc_cells(inputs.metrics)),
    ]
    for name, path in inputs.figures.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(f"<h2>{e(FIGURE_TITLES.get(name, name))}</h2>")
        parts.append(f"<img id='fig-{e(name)}' alt='{e(name)}' src='data:image/png;base64,{data}'>")
    header, rows = _metric_rows(inputs.metrics)
    parts += [
        "<h2>Metrics</h2>",
        "<p class='note'>Bold: the best value at that rate.</p>",
        "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>",
    ]
    for row in rows:
        cells = "".join(
            f"<td class='best'>{e(v)}</td>" if best else f"<td>{e(v)}</td>" for v, best in row
        )
        parts.append(f"<tr>{cells}</tr>")
    parts.append("</table>")
    parts.append(f"<h2>DeLong tests against {e(inputs.reference)}</h2>")
    delong = _delong_wide(inputs.delong)
    parts.append(
        "<p class='note'>AUC difference to the reference and Holm-corrected p-value.</p>"
        + _html_frame(delong)
        if not delong.empty
        else f"<p>No DeLong tests: '{e(inputs.reference)}' was not evaluated.</p>"
    )
    parts += ["<h2>Cohort</h2>", _html_cohort(inputs.cohort)]
    parts += ["<h2>Provenance</h2>", _html_mapping(inputs.provenance)]
    if inputs.config_text:
        parts.append(f"<h3>Resolved config</h3><pre>{e(inputs.config_text)}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _html_warning(warning: str | None) -> list[str]:
    """A banner for what makes the whole report meaningless (e.g. random features)."""
    if not warning:
        return []
    style = "border:2px solid #b00;background:#fee;padding:.6em;font-weight:bold"
    return [f"<p id='warning' style='{style}'>WARNING: {html.escape(warning)}</p>"]


def _html_frame(frame: pd.DataFrame, *, index: bool = True) -> str:
    e = html.escape
    head = ([frame.index.name or ""] if index else []) + [str(c) for c in frame.columns]
    out = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    for key, row in frame.iterrows():
        cells = ([str(key)] if index else []) + [_fmt(v) for v in row]
        out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    return "".join(out) + "</table>"


def _html_mapping(mapping: dict[str, Any]) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><th>{e(str(k))}</th><td>{e(_fmt(v))}</td></tr>" for k, v in mapping.items()
    )
    return f"<table>{rows}</table>"


def _html_cohort(cohort: dict[str, Any]) -> str:
    parts = []
    if cohort.get("splits"):
        parts.append(_html_frame(pd.DataFrame(cohort["splits"]), index=False))
    if cohort.get("clinical_missing"):
        frame = pd.DataFrame(
            {
                "column": list(cohort["clinical_missing"]),
                "share missing": [f"{v:.1%}" for v in cohort["clinical_missing"].values()],
            }
        )
        parts.append("<h3>Clinical missingness per column (whole cohort)</h3>")
        parts.append(_html_frame(frame, index=False))
    details = {k: v for k, v in cohort.items() if k not in ("splits", "clinical_missing")}
    if details:
        parts.append(_html_mapping(details))
    return "".join(parts) or "<p>No cohort summary in this run directory.</p>"


def _fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


# --- Markdown -----------------------------------------------------------------------------------


def render_markdown(inputs: ReportInputs, run_dir: Path) -> str:
    lines = [f"# {inputs.title}", ""]
    if inputs.cohort.get("warning"):
        lines += [f"> **WARNING: {inputs.cohort['warning']}**", ""]
    lines += [_protocol_text(inputs), "", "## AUC by missing rate", ""]
    lines += _md_frame(auc_cells(inputs.metrics)) + [""]
    for name, path in inputs.figures.items():
        rel = Path(path).relative_to(run_dir).as_posix()
        lines += [f"![{FIGURE_TITLES.get(name, name)}]({rel})", ""]
    header, rows = _metric_rows(inputs.metrics)
    lines += ["## Metrics", "", "Bold: the best value at that rate.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(f"**{v}**" if best else v for v, best in row) + " |" for row in rows
    ]
    lines += ["", f"## DeLong tests against {inputs.reference}", ""]
    delong = _delong_wide(inputs.delong)
    lines += _md_frame(delong) if not delong.empty else ["No DeLong tests."]
    lines += ["", "## Cohort", ""]
    if inputs.cohort.get("splits"):
        lines += _md_frame(pd.DataFrame(inputs.cohort["splits"]).set_index("split")) + [""]
    for column, share in inputs.cohort.get("clinical_missing", {}).items():
        lines.append(f"- `{column}` missing in {share:.1%} of patients")
    for key, value in inputs.cohort.items():
        if key not in ("splits", "clinical_missing"):
            lines.append(f"- {key}: {_fmt(value)}")
    lines += ["", "## Provenance", ""]
    lines += [f"- {key}: {_fmt(value)}" for key, value in inputs.provenance.items()]
    if inputs.config_text:
        lines += ["", "```yaml", inputs.config_text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _md_frame(frame: pd.DataFrame) -> list[str]:
    head = [frame.index.name or ""] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in frame.iterrows():
        lines.append("| " + " | ".join([str(key)] + [_fmt(v) for v in row]) + " |")
    return lines
