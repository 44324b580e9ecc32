"""The headline (report box and console) and the console results table."""

from __future__ import annotations

import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from bidistill.cli import app
from bidistill.evaluation.console import print_results
from bidistill.evaluation.headline import build_headline, format_p

from .synthetic import write_run


@pytest.mark.parametrize(
    ("p", "text"),
    [
        (0.000338, "p < 0.001"),
        (1.3e-07, "p < 0.001"),
        (0.0042, "p = 0.004"),
        (0.0321, "p = 0.032"),
        (0.41, "p = 0.41"),
        (1.0, "p = 1.00"),
        (float("nan"), "p = n/a"),
    ],
)
def test_one_p_value_format(p, text):
    assert format_p(p) == text


def _tables(aucs: dict[str, list[float]], p_holm: dict[str, list[float]], n=200, positive=80):
    rates = [0.0, 0.5, 1.0]
    metrics = pd.DataFrame(
        [
            {
                "method": m,
                "missing_rate": r,
                "auc": a,
                "auc_ci_low": a - 0.05,
                "auc_ci_high": a + 0.05,
                "n_patients": n,
                "n_positive": positive,
                "n_mask_seeds": 10,
            }
            for m, values in aucs.items()
            for r, a in zip(rates, values)
        ]
    )
    delong = pd.DataFrame(
        [
            {
                "method": m,
                "reference": "bd",
                "missing_rate": r,
                "auc_difference": aucs[m][i] - aucs["bd"][i],
                "p_holm": p,
            }
            for m, ps in p_holm.items()
            for i, (r, p) in enumerate(zip(rates, ps))
        ]
    )
    return metrics, delong


def test_headline_names_winners_by_rate_and_tests_each_lead():
    metrics, delong = _tables(
        {"bd": [0.80, 0.78, 0.74], "fusion": [0.82, 0.75, 0.70], "wsi": [0.70, 0.70, 0.72]},
        {"fusion": [0.30, 0.02, 0.0004], "wsi": [0.001, 0.01, 0.40]},
    )
    headline = build_headline(metrics, delong, "bd")
    assert [r.best for r in headline.rates] == ["fusion", "bd", "bd"]
    assert headline.winners() == (
        "Highest AUC: fusion at r = 0 (0.820); bd at r = 0.5–1 (0.780 to 0.740)."
    )
    # fusion leads at 0 (tested against bd: p 0.30); bd leads at 0.5 (runner-up fusion, p
    # 0.02) and at 1 (runner-up wsi, p 0.40).
    assert [(r.versus, r.p_holm) for r in headline.rates] == [
        ("bd", 0.30),
        ("fusion", 0.02),
        ("wsi", 0.40),
    ]
    assert headline.rates[0].difference == pytest.approx(0.02)
    assert headline.significance() == (
        "Significant leads (top AUC against bd, or against the runner-up where bd is top; "
        "DeLong, Holm-corrected p < 0.05) at r = 0.5; not significant at r = 0, r = 1."
    )
    assert headline.compared().startswith("3 methods (bd, fusion, wsi) on 200 test patients")
    assert not headline.unreliable and headline.reliability() is None


def test_small_test_sets_are_flagged():
    metrics, delong = _tables(
        {"bd": [0.80, 0.78, 0.74], "wsi": [0.70, 0.70, 0.72]},
        {"wsi": [0.5, 0.6, 0.9]},
        n=40,
        positive=16,
    )
    headline = build_headline(metrics, delong, "bd")
    assert headline.unreliable
    assert "Only 40 test patients (16 positive, 24 negative)" in headline.reliability()
    assert "±0.05" in headline.reliability()
    assert headline.significance().startswith("No lead is statistically significant")


def test_console_table_shows_n_cis_significance_and_explains_r():
    metrics, delong = _tables(
        {"bd": [0.80, 0.78, 0.74], "wsi": [0.70, 0.70, 0.72]},
        {"wsi": [0.01, 0.6, 0.9]},
        n=40,
        positive=16,
    )
    console = Console(record=True, width=100)
    print_results(metrics, delong, reference="bd", console=console)
    text = console.export_text()
    assert "AUC on 40 test patients (16 positive), mean of 10 mask seeds; 95% CI below" in text
    assert ".75–.85" in text  # bd's CI at r = 0
    assert "0.700*" in text and "0.700 " in text  # wsi differs from bd at r = 0 only
    assert "r = share of test patients whose clinical data is withheld" in text
    assert "*: differs from bd at that rate (DeLong, Holm-corrected p < 0.05)" in text
    assert "warning: Only 40 test patients" in text and "not reliable" in text


def test_cli_prints_table_and_legend_on_one_stream(tmp_path):
    write_run(tmp_path / "run", methods=("bd", "wsi-only"), n_patients=120)
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "r=0.8" in result.stdout and "Holm-corrected" in result.stdout
    assert "Holm-corrected" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"next: open {tmp_path / 'run' / 'report.html'}"
    )
