"""The results table that `bidistill run`, `evaluate`, `demo` and `compare` print, with its
legend and headline, all to one stream (stdout) so that a redirect keeps them together.
"""

from __future__ import annotations

from functools import partial

import pandas as pd
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from bidistill.evaluation.headline import (
    RATE_MEANING,
    Headline,
    auc_text,
    build_headline,
    format_p,
    tests_label,
)


def results_table(metrics: pd.DataFrame, headline: Headline, rates: list[float]) -> Table:
    """Methods as rows, ``rates`` as columns; each cell the AUC over its 95% CI. Bold: the
    highest AUC at that rate (ties: all). ``*``: differs from the reference method there."""
    best = metrics.groupby("missing_rate")["auc"].max().map(auc_text)

    def cell(names: tuple, rate: float, row: pd.Series) -> Text:
        mark = "*" if (*names, float(rate)) in headline.significant_cells else " "
        return _auc_cell(row, mark, "bold" if auc_text(row.auc) == best[rate] else "")

    return _rate_table(metrics, ["method"], rates, cell)


def _rate_table(frame: pd.DataFrame, keys: list[str], rates: list[float], cell) -> Table:
    """One row per group of ``keys``, one column per rate: ``cell(names, rate, row)``, or "–"
    where the group lacks the rate."""
    # No edges: the top one would be a line of spaces between the title and the header.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1))
    for key in keys:
        table.add_column(key, no_wrap=True)
    for rate in rates:
        table.add_column(f"r={rate:g}", justify="right", no_wrap=True)
    for names, rows in frame.groupby(keys, sort=False):
        by_rate = rows.set_index("missing_rate")
        cells = [
            cell(names, rate, by_rate.loc[rate]) if rate in by_rate.index else Text("–")
            for rate in rates
        ]
        table.add_row(*names, *cells)
    return table


def _auc_cell(row: pd.Series, mark: str, style: str = "") -> Text:
    cell = Text(f"{auc_text(row.auc)}{mark}", style=style)
    if pd.notna(row.auc_ci_low):
        # 0.812 -> .81: CI bounds at two decimals, so that a cell stays narrow.
        low, high = (f"{v:.2f}".removeprefix("0") for v in (row.auc_ci_low, row.auc_ci_high))
        cell.append(f"\n{low}–{high} ", style="dim")
    return cell


def print_results(
    metrics: pd.DataFrame,
    delong: pd.DataFrame,
    *,
    reference: str,
    console: Console | None = None,
) -> Headline:
    """Print the table, its legend and the headline sentences; return the headline."""
    console = console or Console()
    say = partial(console.print, highlight=False)
    headline = build_headline(metrics, delong, reference)
    seeds = int(metrics["n_mask_seeds"].max()) if "n_mask_seeds" in metrics else None
    over = f", mean of {seeds} mask seeds" if seeds and seeds > 1 else ""
    say(
        f"AUC on {headline.n_patients} test patients ({headline.n_positive} positive){over}; "
        "95% CI below",
        style="bold",
    )
    rates = sorted(metrics["missing_rate"].unique())
    _print_tables(console, _fitting(rates, console, lambda r: results_table(metrics, headline, r)))
    say(
        f"{RATE_MEANING}. bold: highest AUC at that rate. *: differs from {reference} at that "
        f"rate ({tests_label(delong)}, Holm-corrected p < 0.05); no mark: no significant "
        "difference."
    )
    say(f"{headline.winners()} {headline.significance()}")
    if warning := headline.reliability():
        say(Text.assemble(("warning: ", "bold yellow"), warning))
    return headline


# Run names up to this long label the comparison's rows; longer ones get a number and a key.
RUN_NAME_IN_TABLE = 14


def print_comparison(result, *, console: Console | None = None) -> None:
    """AUC and CI per (run, method) and rate, with the paired tests against the first run's
    same method; long run names are keyed by number (each printed whole once)."""
    console = console or Console()
    say = partial(console.print, highlight=False, soft_wrap=True)
    table_data = result.table
    reference = result.runs[0]
    counts = {run: int(rows["n_patients"].iloc[0]) for run, rows in table_data.groupby("run")}
    keyed = max(len(run) for run in result.runs) > RUN_NAME_IN_TABLE
    short = {run: (f"#{i}" if keyed else run) for i, run in enumerate(result.runs, 1)}
    console.print("AUC by run, method and missing rate; 95% CI below", style="bold")
    for run in result.runs:
        key = f"{short[run]} = " if keyed else ""
        role = " (reference for the tests)" if run == reference else ""
        say(f"  {key}{run}: {counts[run]} test patients{role}")
    significant = {
        (short[row.run], row.method, float(row.missing_rate))
        for row in result.delong.itertuples()
        if row.p_holm < 0.05
    }
    shown = table_data.assign(run=table_data["run"].map(short))

    def cell(names: tuple, rate: float, row: pd.Series) -> Text:
        return _auc_cell(row, "*" if (*names, float(rate)) in significant else " ")

    rates = sorted(table_data["missing_rate"].unique())
    tables = _fitting(rates, console, lambda r: _rate_table(shown, ["run", "method"], r, cell))
    _print_tables(console, tables)
    test = tests_label(result.delong)
    console.print(
        f"{RATE_MEANING}. *: differs from the same method in {reference} at that rate "
        f"(paired {test}, Holm-corrected p < 0.05).",
        highlight=False,
    )
    for rate, runs in result.left_out.items():
        say(
            Text.assemble(
                ("left out: ", "yellow"),
                f"r = {rate:g}, evaluated only in {', '.join(runs)}; the table and tests use "
                "the rates every run has.",
            )
        )
    if len(result.delong):
        smallest = result.delong.loc[result.delong["p_holm"].idxmin()]
        say(
            f"{int((result.delong['p_holm'] < 0.05).sum())} of {len(result.delong)} paired tests "
            f"significant; smallest: {smallest.run} {smallest.method} at r = "
            f"{smallest.missing_rate:g}, {smallest.auc_difference:+.3f} AUC, "
            f"{format_p(smallest.p_holm)}."
        )
    for run, why in result.unpaired.items():
        say(Text.assemble(("not tested: ", "yellow"), f"{run} has {why}: compare its CIs only."))


def _print_tables(console: Console, tables: list[Table]) -> None:
    """Each table followed by an empty line, which sets it apart from the next and the legend."""
    for table in tables:
        console.print(table)
        console.print()


def _fitting(rates: list[float], console: Console, build) -> list[Table]:
    """Tables of ``build(rates)`` for as many rates at a time as fit the console's width."""
    for parts in range(1, len(rates) + 1):
        per_table = -(-len(rates) // parts)  # as even as possible: 3 + 3, not 5 + 1
        tables = [build(rates[i : i + per_table]) for i in range(0, len(rates), per_table)]
        unlimited = console.options.update_width(10_000)  # measure, do not clamp to the console
        if all(Measurement.get(console, unlimited, t).maximum <= console.width for t in tables):
            return tables
    return tables
