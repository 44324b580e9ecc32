"""``report.html``: one self-contained page (no script, no external resource) that reads at any
width from 820 px up and prints on A4/Letter, each method in its colour.
"""

from __future__ import annotations

import base64
import html
from typing import Any

import pandas as pd

from bidistill.evaluation.headline import format_p, tests_label
from bidistill.evaluation.plots import method_colour
from bidistill.evaluation.report import (
    ReportInputs,
    best_flags,
    confusion_title,
    fmt,
    headline_rows,
    limitations,
    metric_groups,
    options_text,
    protocol_text,
)

e = html.escape

CSS = """
:root{--ink:#1d1d1f;--muted:#5b5b66;--line:#d9d9de;--soft:#f4f4f6}*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:var(--ink);
margin:0 auto;max-width:1120px;padding:1.2em 1.2em 3em}
h1{font-size:1.5em;margin:.2em 0 .1em}
h2{font-size:1.2em;margin:2.2em 0 .5em;border-bottom:1px solid var(--line);padding-bottom:.2em}
h3{font-size:1em;margin:1.2em 0 .4em}p{margin:.4em 0}.meta,.note{color:var(--muted);font-size:.9em}
.banner{background:#fdecea;border:2px solid #b3261e;color:#601410;border-radius:8px;
padding:.7em 1em;margin:1em 0;font-size:1.02em}
.headline{background:#f1f6fb;border:2px solid #2f5d8a;border-radius:10px;padding:.9em 1.2em;
margin:1em 0 1.4em}
.headline .lead{font-size:1.4em;font-weight:650;line-height:1.3;margin:.1em 0 .35em}
.headline table{background:#fff;margin:.6em 0}
.sig{color:#1b5e20;font-weight:600}.nonsig{color:#8a4b00;font-weight:600}
.warn{background:#fff4e0;border-left:4px solid #e08a00;padding:.45em .8em;margin:.6em 0}
nav{display:flex;flex-wrap:wrap;gap:.15em 1em;font-size:.9em;margin:.4em 0 0}
nav a{color:#2f5d8a;text-decoration:none;white-space:nowrap}.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.86em;font-variant-numeric:tabular-nums;margin:.4em 0}
th,td{padding:.28em .5em;border-bottom:1px solid var(--line);text-align:right;vertical-align:top;
white-space:nowrap}
thead th{background:var(--soft);font-weight:600;border-bottom:2px solid var(--line)}
.l{text-align:left}td.best{font-weight:700;background:#e9f5ea}
td.wrap{white-space:normal;min-width:16em;text-align:left}
tbody th.group{text-align:left;background:#fff;font-weight:600;padding-top:.9em;
border-bottom:2px solid var(--line)}
.ci{display:block;color:var(--muted);font-size:.86em}.muted{color:var(--muted);font-size:.86em}
table.dense th,table.dense td{padding:.28em .38em}table.dense th.group{padding-top:.9em}
.sw{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.45em;
vertical-align:-.05em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:1em 1.2em}
figure{margin:.4em 0}img{display:block;max-width:100%;height:auto}
figure.wide img{width:100%;max-width:900px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:.8em}
.card{border:1px solid var(--line);border-radius:8px;padding:.5em .8em}
.card h3{margin:.2em 0}.card table{font-size:.82em;margin:.2em 0}
.card th,.card td{padding:.2em .45em;text-align:center}.card th.l{text-align:left}
ul.card-list li{margin:.35em 0}details{margin:2em 0}summary{cursor:pointer;font-weight:600}
pre{background:var(--soft);padding:.8em;overflow-x:auto;font-size:.8em;max-width:100%}
@media print{
body{max-width:none;padding:0;font-size:10.5pt}nav,details{display:none}
.grid{grid-template-columns:1fr 1fr}.scroll{overflow:visible}
section,figure,.card,tr,.headline,.banner{break-inside:avoid}h2{break-after:avoid}
}
"""


def render_html(inputs: ReportInputs) -> str:
    headline = inputs.headline
    meta = [f"{headline.n_patients} test patients"]
    meta += [
        f"{k} {inputs.provenance[k]}"
        for k in ("run started", "bidistill", "git commit")
        if k in inputs.provenance
    ]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{e(inputs.title)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>{e(inputs.title)}</h1><p class='meta'>{e(' · '.join(meta))}</p></header>",
    ]
    if inputs.synthetic:
        title, _, text = inputs.synthetic.partition(": ")
        parts.append(
            "<div class='banner' id='synthetic-banner' role='note'>"
            f"<strong>{e(title)}:</strong> {e(text)}</div>"
        )
    limits = "".join(f"<li><strong>{e(h)}.</strong> {e(t)}</li>" for h, t in limitations(inputs))
    sections = [
        ("auc", "AUC by missing rate", _auc_table(inputs, headline)),
        *[(group.key, group.title, _figure_group(group)) for group in inputs.figures],
        ("confusion", confusion_title(inputs), _confusion(inputs)),
        ("metrics", "All metrics", _metrics_table(inputs)),
        ("delong", f"Paired tests against {inputs.reference}", _delong(inputs)),
        ("methods", "Methods and their options", _methods(inputs)),
        ("cohort", "Cohort", _cohort(inputs.cohort)),
        ("protocol", "How the numbers were made", f"<p>{e(protocol_text(inputs))}</p>"),
        ("limitations", "Intended use and limitations", f"<ul class='card-list'>{limits}</ul>"),
        ("provenance", "Provenance", _mapping(inputs.provenance)),
    ]
    parts += [_headline(inputs, headline), _nav(inputs)]
    parts += [f"<section id='{e(k)}'><h2>{e(t)}</h2>{body}</section>" for k, t, body in sections]
    if inputs.config_text:
        lines = inputs.config_text.count("\n")
        parts.append(
            f"<details id='config'><summary>Resolved config ({lines} lines)</summary>"
            f"<pre>{e(inputs.config_text)}</pre></details>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _nav(inputs: ReportInputs) -> str:
    links = [("auc", "AUC table")] + [(g.key, g.title) for g in inputs.figures]
    links += [
        ("confusion", "confusion matrices"),
        ("metrics", "all metrics"),
        ("delong", "paired tests"),
        ("methods", "methods"),
        ("cohort", "cohort"),
        ("limitations", "limitations"),
        ("provenance", "provenance"),
    ]
    anchors = "".join(f"<a href='#{e(k)}'>{e(t)}</a>" for k, t in links)
    return f"<nav aria-label='Contents'>{anchors}</nav>"


def _swatch(method: str) -> str:
    return f"<span class='sw' style='background:{method_colour(method)}'></span>{e(method)}"


def _headline(inputs: ReportInputs, headline) -> str:
    rows = headline_rows(headline)
    head = "".join(f"<th class='{_align(k)}'>{e(k)}</th>" for k in rows[0]) if rows else ""
    body = []
    for row, result in zip(rows, headline.rates):
        cells = []
        for key, value in row.items():
            leaders = " and ".join(_swatch(m) for m in result.tied or [result.best])
            text = leaders if key == "highest AUC" else e(value)
            cls = _align(key)
            if key == "significant" and value in ("yes", "no"):
                cls += " sig" if value == "yes" else " nonsig"
            cells.append(f"<td class='{cls}'>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    verdict_cls = "sig" if all(r.significant for r in headline.rates) else "nonsig"
    warning = headline.reliability()
    return (
        "<section class='headline' id='headline' aria-label='Headline'>"
        f"<p class='lead'>{e(headline.winners())}</p>"
        f"<p class='{verdict_cls}'>{e(headline.significance())}</p>"
        f"<p>Compared: {e(headline.compared())}</p>"
        + _table(head, body)
        + (f"<p class='warn'><strong>Warning:</strong> {e(warning)}</p>" if warning else "")
        + "</section>"
    )


def _align(key: str) -> str:
    return "l" if key in ("highest AUC", "tested against", "method") else ""


def _auc_table(inputs: ReportInputs, headline) -> str:
    flags = best_flags(inputs.metrics)

    def cell(i: int, row: pd.Series) -> str:
        mark = "*" if (row.method, float(row.missing_rate)) in headline.significant_cells else ""
        ci = (
            ""
            if pd.isna(row.auc_ci_low)
            else f"<span class='ci'>{row.auc_ci_low:.2f}–{row.auc_ci_high:.2f}</span>"
        )
        best = " class='best'" if flags.at[i, "auc"] else ""
        return f"<td{best}>{row.auc:.3f}{mark}{ci}</td>"

    legend = (
        "r: share of test patients whose clinical data is withheld (0: all have it). Each cell: "
        "the AUC (mean over mask seeds) over its 95% CI. Bold: the highest AUC at that rate. "
        f"*: differs from {inputs.reference} at that rate ({tests_label(inputs.delong)}, "
        "Holm-corrected p < 0.05)."
    )
    return _note(legend) + _by_rate(inputs.metrics, cell)


def _by_rate(frame: pd.DataFrame, cell) -> str:
    """A method x rate table; ``cell(index, row)`` makes the ``<td>`` of each row of ``frame``."""
    rates = sorted(frame["missing_rate"].unique())
    head = "<th class='l'>method</th>" + "".join(f"<th>r = {r:g}</th>" for r in rates)
    rows = []
    for method in dict.fromkeys(frame["method"]):
        cells = [f"<td class='l'>{_swatch(method)}</td>"]
        for rate in rates:
            match = frame[(frame["method"] == method) & (frame["missing_rate"] == rate)]
            cells.append(cell(match.index[0], match.iloc[0]))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return _table(head, rows)


def _table(head: str, rows: list[str]) -> str:
    """A table in its own scrolling box, so that the page never scrolls sideways."""
    return (
        f"<div class='scroll'><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _note(text: str) -> str:
    return f"<p class='note'>{e(text)}</p>"


def _metrics_table(inputs: ReportInputs) -> str:
    header, groups = metric_groups(inputs.metrics)
    head = "<th class='l'>method</th>" + "".join(f"<th>{e(h)}</th>" for h in header)
    bodies = []
    for rate, rows in groups:
        title = f"r = {rate:g}: clinical data withheld from {rate:.0%} of the test patients"
        out = [f"<tr><th class='group' colspan='{len(header) + 1}'>{e(title)}</th></tr>"]
        for method, cells in rows:
            tds = "".join(
                f"<td class='best'>{e(v)}</td>" if best else f"<td>{e(v)}</td>" for v, best in cells
            )
            out.append(f"<tr><td class='l'>{_swatch(method)}</td>{tds}</tr>")
        bodies.append("<tbody>" + "".join(out) + "</tbody>")
    decided = (
        "Thresholded metrics use the threshold in the last column, chosen on the validation "
        "patients."
        if "threshold" in header
        else "Each patient is given the class of highest probability."
    )
    note = (
        "Grouped by missing rate; bold: the best value within the group (highest, or lowest for "
        f"Brier score and ECE). {decided}"
    )
    return (
        f"{_note(note)}<div class='scroll'><table class='dense'><thead><tr>"
        f"{head}</tr></thead>" + "".join(bodies) + "</table></div>"
    )


def _delong(inputs: ReportInputs) -> str:
    delong = inputs.delong
    if delong.empty:
        return f"<p>No paired tests: '{e(inputs.reference)}' was not evaluated.</p>"

    def cell(_: int, row: pd.Series) -> str:
        cls = ' class="best"' if row.p_holm < 0.05 else ""
        p = e(format_p(row.p_holm))
        return f"<td{cls}>{row.auc_difference:+.3f}<span class='ci'>{p}</span></td>"

    note = (
        f"AUC difference to {inputs.reference} (method minus {inputs.reference}) and the "
        f"Holm-corrected p-value ({tests_label(delong)}); highlighted: p < 0.05."
    )
    return _note(note) + _by_rate(delong, cell)


def _confusion(inputs: ReportInputs) -> str:
    frame = inputs.confusion
    if frame.empty:
        return "<p>No confusion matrices.</p>"
    if "true" in frame.columns:
        return _class_confusion(frame)
    cards = []
    for method, rows in frame.groupby("method", sort=False):
        rates = list(rows.itertuples())
        top = "".join(
            f"<th colspan='2'>r = {r.missing_rate:g}<span class='ci'>threshold "
            f"{r.threshold:.2f}</span></th>"
            for r in rates
        )
        sub = "<th>+</th><th>−</th>" * len(rates)
        positive = "".join(f"<td>{r.tp}</td><td>{r.fn}</td>" for r in rates)
        negative = "".join(f"<td>{r.fp}</td><td>{r.tn}</td>" for r in rates)
        rates_text = "".join(
            f"<td colspan='2' class='muted'>sens. {r.tp / max(r.tp + r.fn, 1):.2f}<br>"
            f"spec. {r.tn / max(r.tn + r.fp, 1):.2f}</td>"
            for r in rates
        )
        cards.append(
            f"<div class='card'><h3>{_swatch(method)}</h3><table>"
            f"<thead><tr><th></th>{top}</tr><tr><th class='l'>predicted</th>{sub}</tr></thead>"
            f"<tbody><tr><th class='l'>actual +</th>{positive}</tr>"
            f"<tr><th class='l'>actual −</th>{negative}</tr>"
            f"<tr><td></td>{rates_text}</tr></tbody></table></div>"
        )
    note = (
        "Test patients by true and predicted class at the first and last missing rate, at the "
        "threshold chosen on the validation patients (Youden's J unless the config fixes one); "
        "first mask seed (at these two rates every seed withholds the same patients)."
    )
    return f"{_note(note)}<div class='cards'>{''.join(cards)}</div>"


def _class_confusion(frame: pd.DataFrame) -> str:
    """K-class matrices: per method and rate a row per true class, a column per predicted."""
    predicted = [c for c in frame.columns if c.startswith("→ ")]
    cards = []
    for (method, rate), rows in frame.groupby(["method", "missing_rate"], sort=False):
        head = "<th class='l'>true \\ predicted</th>" + "".join(
            f"<th>{e(c[2:])}</th>" for c in predicted
        )
        body = [
            f"<tr><th class='l'>{e(r['true'])}</th>"
            + "".join(f"<td>{int(r[c])}</td>" for c in predicted)
            + "</tr>"
            for _, r in rows.iterrows()
        ]
        cards.append(
            f"<div class='card'><h3>{_swatch(method)} · r = {rate:g}</h3><table>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
        )
    note = (
        "Test patients by true class (rows) and predicted class (columns, the class of highest "
        "probability) at the first and last missing rate; first mask seed (at these two rates "
        "every seed withholds the same patients)."
    )
    return f"{_note(note)}<div class='cards'>{''.join(cards)}</div>"


def _methods(inputs: ReportInputs) -> str:
    if not inputs.methods:
        return "<p>No method details in this run directory.</p>"
    head = (
        "<th class='l'>entry</th><th class='l'>method</th><th class='l'>set in the config</th>"
        "<th class='l'>all options (defaults included)</th><th>epochs run</th>"
        "<th>best epoch</th><th>training (s)</th>"
    )
    rows = []
    for info in inputs.methods:
        best = ", ".join(str(b) for b in info.best_epochs) or "–"
        seconds = f"{info.train_seconds:.1f}" if info.train_seconds is not None else "–"
        rows.append(
            f"<tr><td class='l'>{_swatch(info.key)}</td><td class='l'>{e(info.name)}</td>"
            f"<td class='wrap'>{e(options_text(info.given))}</td>"
            f"<td class='wrap'>{e(options_text(info.options))}</td>"
            f"<td>{info.epochs_run or '–'}</td><td>{e(best)}</td><td>{seconds}</td></tr>"
        )
    note = (
        "Each entry of the config's methods: its registry method, the options the config sets "
        "and every option it trained with. Best epoch: the epoch whose weights were kept (one "
        "per training stage), counted from 1."
    )
    return _note(note) + _table(head, rows)


def _cohort(cohort: dict[str, Any]) -> str:
    parts = []
    if cohort.get("splits"):
        parts.append(_frame(pd.DataFrame(cohort["splits"])))
    if missing := cohort.get("clinical_missing"):
        shares = {"column": list(missing), "share missing": [f"{v:.1%}" for v in missing.values()]}
        parts.append("<h3>Clinical missingness per column (whole cohort)</h3>")
        parts.append(_frame(pd.DataFrame(shares)))
    if details := {k: v for k, v in cohort.items() if k not in ("splits", "clinical_missing")}:
        parts.append(_mapping(details))
    return "".join(parts) or "<p>No cohort summary in this run directory.</p>"


def _frame(frame: pd.DataFrame) -> str:
    head = "".join(
        f"<th class='{'l' if i == 0 else ''}'>{e(str(c))}</th>" for i, c in enumerate(frame)
    )
    rows = []
    for _, row in frame.iterrows():
        cells = "".join(
            f"<td class='{'l' if i == 0 else ''}'>{e(fmt(v))}</td>" for i, v in enumerate(row)
        )
        rows.append(f"<tr>{cells}</tr>")
    return _table(head, rows)


def _mapping(mapping: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th class='l'>{e(str(k))}</th><td class='l wrap'>{e(fmt(v))}</td></tr>"
        for k, v in mapping.items()
    )
    return f"<div class='scroll'><table><tbody>{rows}</tbody></table></div>"


def _figure_group(group) -> str:
    figures = []
    for path, alt in group.figures:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        cls = ' class="wide"' if group.wide else ""
        figures.append(
            f"<figure{cls}>"
            f"<img id='fig-{e(path.stem)}' alt='{e(alt)}' src='data:image/png;base64,{data}'>"
            "</figure>"
        )
    body = "".join(figures) if group.wide else f"<div class='grid'>{''.join(figures)}</div>"
    return _note(group.caption) + body
