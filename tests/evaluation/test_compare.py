"""`bidistill compare`: a table and a plot across runs, paired tests where the patients match."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from bidistill._io import write_csv, write_text
from bidistill.cli import app
from bidistill.evaluation import PredictionsError, evaluate_run
from bidistill.evaluation.compare import compare_runs

from .synthetic import method_frame

CONFIG = "\n".join(
    [
        "name: {name}",
        "cohort:",
        "  table: cohort.csv",
        "  patient_column: id",
        "  label: {{column: y, positive: ['1']}}",
        "methods: [bd, wsi-only]",
        "evaluation: {{mask_seeds: 3, bootstrap: 100}}",
        "",
    ]
)


def _run(folder, *, n_patients=240, degrade_bd=False):
    for method in ("bd", "wsi-only"):
        frame = method_frame(method, n_patients=n_patients)
        if degrade_bd and method == "bd":
            # Another "encoder": without clinical data bd ranks patients almost at random.
            rng = np.random.default_rng(5)
            frame["prob_absent"] = 0.2 * frame["prob_absent"] + 0.8 * rng.random(len(frame))
        write_csv(folder / method / "predictions.csv", frame)
    write_text(folder / "config.yaml", CONFIG.format(name=folder.name))
    evaluate_run(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return (
        _run(root / "resnet"),
        _run(root / "uni", degrade_bd=True),
        _run(root / "small", n_patients=160),
    )


def test_paired_tests_where_the_test_patients_match(runs, tmp_path):
    resnet, uni, small = runs
    result = compare_runs([resnet, uni, small], tmp_path / "cmp")
    assert result.runs == ["resnet", "uni", "small"]
    assert set(result.table["run"]) == {"resnet", "uni", "small"}
    assert len(result.table) == 3 * 2 * 6
    # small has other test patients: shown, not tested.
    assert set(result.delong["run"]) == {"uni"}
    assert "other test patients" in result.unpaired["small"]
    delong = result.delong.set_index(["method", "missing_rate"])
    # Identical predictions: no difference at all.
    assert delong.loc[("wsi-only", 0.0), "auc_difference"] == pytest.approx(0, abs=1e-12)
    assert delong.loc[("wsi-only", 0.0), "p_value"] == 1.0
    # The degraded bd is the same with clinical data and clearly worse without it.
    assert delong.loc[("bd", 0.0), "auc_difference"] == pytest.approx(0, abs=1e-12)
    assert delong.loc[("bd", 1.0), "auc_difference"] < -0.1
    # 60 test patients (24 positive): below 30 per class the test is the permutation test.
    assert set(result.delong["test"]) == {"permutation"}
    assert delong.loc[("bd", 1.0), "p_holm"] < 0.01
    # The AUCs the test compares are the runs' own seed-averaged AUCs.
    metrics = pd.read_csv(uni / "metrics.csv").set_index(["method", "missing_rate"])
    assert delong.loc[("bd", 1.0), "auc"] == pytest.approx(metrics.loc[("bd", 1.0), "auc"])
    for path in (result.table_path, result.delong_path, result.figure_path):
        assert path.is_file()
    with Image.open(result.figure_path) as png:
        assert png.width > 800


def test_cli_compare_prints_the_table_and_says_what_was_not_tested(runs, tmp_path):
    resnet, uni, small = runs
    result = CliRunner().invoke(
        app,
        ["compare", str(resnet), str(uni), str(small), "--out", str(tmp_path / "c"), "-m", "bd"],
    )
    assert result.exit_code == 0, result.output
    assert "resnet" in result.stdout and "r=0.8" in result.stdout
    assert "*: differs from the same method in resnet" in " ".join(result.stdout.split())
    assert "not tested: small has other test patients" in " ".join(result.stdout.split())
    assert set(pd.read_csv(tmp_path / "c" / "compare.csv")["method"]) == {"bd"}
    assert result.stderr.strip().splitlines()[-1] == f"next: open {tmp_path / 'c' / 'compare.png'}"


def test_compare_refuses_unevaluated_runs(runs, tmp_path):
    raw = tmp_path / "raw"
    write_csv(raw / "bd" / "predictions.csv", method_frame("bd"))  # trained, not evaluated
    with pytest.raises(PredictionsError, match=f"not evaluated yet .*bidistill evaluate {raw}$"):
        compare_runs([runs[0], raw], tmp_path / "out")
    one = CliRunner().invoke(app, ["compare", str(runs[0])])
    assert one.exit_code == 1 and "at least two run directories" in one.output
