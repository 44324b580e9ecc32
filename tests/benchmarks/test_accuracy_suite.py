"""The accuracy suite end to end on a tenth of one generator (`make bench-accuracy` in small)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SUITE_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy" / "run.py"


@pytest.mark.slow
def test_the_suite_reports_gaps_to_the_limit_and_paired_differences(tmp_path):
    out = tmp_path / "accuracy.json"
    command = [
        sys.executable,
        str(SUITE_SCRIPT),
        "--generators",
        "slides-see-all",
        "--methods",
        "bd,wsi-only,clinical-linear",
        "--seeds",
        "2",
        "--scale",
        "0.2",
        "--training",
        "epochs=2",
        "--workers",
        "1",
        "--cache",
        str(tmp_path / "cache"),
        "--workdir",
        str(tmp_path / "runs"),
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    summary = result["summary"]
    labels = {"bd", "bd-paper", "wsi-only", "clinical-linear"}
    assert {row["method"] for row in summary} == labels
    rates = {row["missing_rate"] for row in summary}
    assert rates == {"0.0", "0.2", "0.4", "0.6", "0.8", "1.0", "mean"}
    for row in summary:
        assert row["seeds"] == 2
        assert row["gap"] == pytest.approx(row["limit"] - row["auc"], abs=1e-9)
        if row["method"] == "bd":
            assert row["diff_to_bd"] == 0
        else:
            assert row["diff_ci_low"] <= row["diff_to_bd"] <= row["diff_ci_high"]
    # Without clinical data a clinical-only model has nothing to rank by.
    at_one = {r["method"]: r for r in summary if r["missing_rate"] == "1.0"}
    assert at_one["clinical-linear"]["auc"] == pytest.approx(0.5)
    # The limit does not depend on the method, and with clinical data it is higher.
    limits = {(r["missing_rate"], r["limit"]) for r in summary}
    assert len(limits) == len(rates)
    by_rate = dict(limits)
    assert by_rate["0.0"] > by_rate["1.0"]
    assert any("bd WSI branch" in c["name"] for c in result["checks"])
    table = out.with_suffix(".md").read_text()
    assert "Bayes limit" in table and "| slides-see-all | wsi-only | 1.0 |" in table
    # A rerun with the same working folder trains nothing again, and reports the time each run
    # took when it was trained.
    models = sorted((tmp_path / "runs").glob("*/seed*/*/model.safetensors"))
    assert len(models) == 2 * len(labels)
    written = [m.stat().st_mtime_ns for m in models]
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    rerun = json.loads(out.read_text())
    assert rerun["summary"] == summary
    assert [m.stat().st_mtime_ns for m in models] == written
    for t in rerun["timings"]:
        run = tmp_path / "runs" / t["generator"] / f"seed{t['seed']}" / t["method"]
        trained = json.loads((run / "model.json").read_text())["train_seconds"]
        assert t["cpu"] == pytest.approx(trained, abs=0.051) and trained > 0  # JSON: 0.1 s


@pytest.mark.slow
def test_an_entry_runs_a_method_with_other_options_beside_it(tmp_path):
    """``--entry wsi-deep:wsi-only:bag_layers=1`` (README, "Three classes"): one layer more
    after the pooling, trained and reported beside ``wsi-only`` against the same limits."""
    out = tmp_path / "accuracy.json"
    command = [sys.executable, str(SUITE_SCRIPT), "--generators", "three-class", "--seeds", "1"]
    command += [
        "--methods",
        "wsi-only",
        "--variant",
        "",
        "--entry",
        "wsi-deep:wsi-only:bag_layers=1",
    ]
    command += ["--scale", "0.1", "--workers", "1", "--training", "epochs=2"]
    command += ["--cache", str(tmp_path / "cache"), "--workdir", str(tmp_path / "runs")]
    done = subprocess.run(
        [*command, "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(out.read_text())["summary"]
    at_one = {r["method"]: r for r in summary if r["missing_rate"] == "1.0"}
    assert set(at_one) == {"wsi-only", "wsi-deep"}
    assert at_one["wsi-only"]["limit"] == at_one["wsi-deep"]["limit"]
    runs = tmp_path / "runs" / "three-class" / "seed0"
    options = {
        label: json.loads((runs / label / "model.json").read_text())["options"] for label in at_one
    }
    assert options["wsi-deep"] == {**options["wsi-only"], "bag_layers": 1}
    only = (runs / "wsi-only" / "predictions.csv").read_text()
    assert only != (runs / "wsi-deep" / "predictions.csv").read_text()
