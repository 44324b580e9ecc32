"""The results table that `bidistill run`, `evaluate` and `demo` print: AUC with its CI per
method and missing rate, which differences are significant, and what the numbers can carry.

Everything goes to one stream (stdout), table and legend together, so that redirecting the
output keeps them side by side.
"""

from __future__ import annotations

import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bidistill.evaluation.headline import RATE_MEANING, Headline, build_headline


def results_table(metrics: pd.DataFrame, headline: Headline) -> Table:
    """Methods as rows, rates as columns; each cell the AUC over its 95% CI.

    Bold: the highest AUC at that rate. ``*``: differs from the reference method at that rate
    (DeLong, Holm-corrected p < 0.05).
    """
    rates = sorted(metrics["missing_rate"].unique())
    best = metrics.groupby("missing_rate")["auc"].max()
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    table.add_column("method", no_wrap=True)
    for rate in rates:
        table.add_column(f"r={rate:g}", justify="right", no_wrap=True)
    for method, rows in metrics.groupby("method", sort=False):
        by_rate = rows.set_index("missing_rate")
        cells = []
        for rate in rates:
            row = by_rate.loc[rate]
            mark = "*" if (method, float(rate)) in headline.significant_cells else " "
            style = "bold" if row.auc >= best[rate] - 1e-12 else ""
            cell = Text(f"{row.auc:.3f}{mark}", style=style)
            if pd.notna(row.auc_ci_low):
                cell.append(f"\n{_short(row.auc_ci_low)}–{_short(row.auc_ci_high)} ", style="dim")
            cells.append(cell)
        table.add_row(method, *cells)
    return table


def _short(value: float) -> str:
    """0.812 -> .81: CI bounds at two decimals, so that a cell stays narrow."""
    return f"{value:.2f}".removeprefix("0")


def print_results(
    metrics: pd.DataFrame,
    delong: pd.DataFrame,
    *,
    reference: str,
    console: Console | None = None,
) -> Headline:
    """Print the table, its legend and the headline sentences; return the headline."""
    console = console or Console()
    headline = build_headline(metrics, delong, reference)
    seeds = int(metrics["n_mask_seeds"].max()) if "n_mask_seeds" in metrics else None
    over = f", mean over {seeds} mask seeds" if seeds and seeds > 1 else ""
    console.print(
        f"AUC on {headline.n_patients} test patients ({headline.n_positive} positive){over}; "
        "below each AUC its 95% CI",
        highlight=False,
        style="bold",
    )
    console.print(results_table(metrics, headline))
    console.print(
        f"{RATE_MEANING}. bold: highest AUC at that rate. *: differs from {reference} at that "
        "rate (DeLong, Holm-corrected p < 0.05); no mark: no significant difference.",
        highlight=False,
    )
    console.print(f"{headline.winners()} {headline.significance()}", highlight=False)
    warning = headline.reliability()
    if warning:
        console.print(Text.assemble(("warning: ", "bold yellow"), warning), highlight=False)
    return headline
