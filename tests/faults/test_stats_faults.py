"""`bidistill compare` faults: stale evaluations, runs evaluated at other missing rates, folders
that are not runs, and a table that must stay whole at 80 columns."""

from __future__ import annotations

import shlex

import pandas as pd
import pytest
import yaml

from bidistill._io import write_csv, write_text
from bidistill.evaluation.freshness import evaluation_check

from ..evaluation.synthetic import method_frame
from .conftest import assert_one_line_error, invoke, runner


def _evaluated_run(folder, *, rates=None, methods=("bd", "wsi-only"), name=None):
    """A run folder with every method's predictions and a config, evaluated by the CLI."""
    for method in methods:
        write_csv(folder / method / "predictions.csv", method_frame(method, n_patients=160))
    evaluation = {"mask_seeds": 2, "bootstrap": 50}
    if rates:
        evaluation["missing_rates"] = rates
    config = {
        "name": name or folder.name,
        "cohort": {
            "table": "cohort.csv",
            "patient_column": "id",
            "label": {"column": "y", "positive": ["1"]},
        },
        "methods": list(methods),
        "evaluation": evaluation,
    }
    write_text(folder / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    result = invoke("evaluate", folder)
    assert result.exit_code == 0, result.output
    return folder


def test_compare_refuses_a_run_retrained_after_its_evaluation(trained_run, run_copy, tmp_path):
    config, original = trained_run
    _, run_dir = run_copy
    before = pd.read_csv(run_dir / "metrics.csv")
    # Retrain one method as the docs allow: delete its folder, `bidistill train` it again.
    for path in sorted((run_dir / "wsi-only").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (run_dir / "wsi-only").rmdir()
    trained = invoke("train", config, "--method", "wsi-only", "--out", run_dir, "--seed", "7")
    assert trained.exit_code == 0, trained.output
    out = tmp_path / "cmp"
    stale = invoke("compare", original, run_dir, "--out", out)
    error = assert_one_line_error(
        stale, str(run_dir), "out of date", "predictions: changed for 1 method(s) (wsi-only)"
    )
    assert not out.exists()  # nothing shown, nothing written
    # The command in the message works as printed, and compare then shows the new numbers.
    fix = error.split("evaluate the run again: ")[1]
    assert fix == f"bidistill evaluate {shlex.quote(str(run_dir))}"
    evaluated = invoke(*shlex.split(fix)[1:])
    assert evaluated.exit_code == 0, evaluated.output
    after = invoke("compare", original, run_dir, "--out", out)
    assert after.exit_code == 0, after.output
    table = pd.read_csv(out / "compare.csv")
    new = pd.read_csv(run_dir / "metrics.csv")
    shown = table[table["run"].str.endswith(f"{run_dir.parent.name}/run")]
    assert shown["auc"].tolist() == pytest.approx(new["auc"].tolist())
    assert not new["auc"].equals(before["auc"])  # the retrained method scores differently
    # The record `bidistill run` reads says the evaluation is current again.
    assert evaluation_check(run_dir)


def test_compare_uses_the_rates_every_run_has_and_names_the_others(tmp_path):
    a = _evaluated_run(tmp_path / "a", rates=[0.0, 0.5, 1.0])
    b = _evaluated_run(tmp_path / "b", rates=[0.0, 1.0])
    result = invoke("compare", a, b, "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    flat = " ".join(result.stdout.split())
    assert "left out: r = 0.5, evaluated only in a" in flat
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert sorted(table["missing_rate"].unique()) == [0.0, 1.0]
    tests = pd.read_csv(tmp_path / "cmp" / "compare_delong.csv")
    assert sorted(tests["missing_rate"].unique()) == [0.0, 1.0]
    assert tests["p_value"].notna().all()


def test_compare_of_runs_without_a_common_rate_is_one_clear_error(tmp_path):
    a = _evaluated_run(tmp_path / "a", rates=[0.0, 0.5])
    b = _evaluated_run(tmp_path / "b", rates=[0.2, 1.0])
    result = invoke("compare", a, b, "--out", tmp_path / "cmp")
    assert_one_line_error(
        result, "share no missing rate", "a: 0, 0.5", "b: 0.2, 1", "evaluation.missing_rates"
    )


def test_compare_on_a_folder_that_is_not_a_run(tmp_path):
    run = _evaluated_run(tmp_path / "runs" / "a")
    features = tmp_path / "features"
    features.mkdir()
    (features / "S1.h5").write_bytes(b"")
    result = invoke("compare", run, features, "--out", tmp_path / "cmp")
    error = assert_one_line_error(
        result, f"{features} is not a run folder", "config.yaml", "metrics.csv"
    )
    assert "bidistill evaluate" not in error
    assert error.endswith("Make a run with: bidistill run CONFIG --out DIR")
    missing = invoke("compare", run, tmp_path / "nowhere")
    assert_one_line_error(missing, f"{tmp_path / 'nowhere'}: no such folder")
    # A folder of runs: the hint names them, and the command it prints works.
    _evaluated_run(tmp_path / "runs" / "b")
    parent = invoke("compare", run, tmp_path / "runs", "--out", tmp_path / "cmp")
    error = assert_one_line_error(parent, f"{tmp_path / 'runs'} is not a run folder")
    hint = error.split("compare those: ")[1]
    result = invoke(*shlex.split(hint)[1:], "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output


LONG_NAMES = ["resnet50-trident-baseline-2024", "uni2-h-finetuned-on-bcnb-fold-all"]
FOUR_METHODS = ("bd", "wsi-only", "fusion-zero", "clinical-only")


@pytest.fixture(scope="module")
def long_named_runs(tmp_path_factory) -> list:
    """Two evaluated runs with long names and four methods each (read only by the tests)."""
    folder = tmp_path_factory.mktemp("long-names")
    return [_evaluated_run(folder / n, methods=FOUR_METHODS) for n in LONG_NAMES]


@pytest.mark.parametrize("columns", [80, 60])
def test_compare_at_80_columns_cuts_no_name_method_or_ci(long_named_runs, tmp_path, columns):
    names, methods, runs = LONG_NAMES, FOUR_METHODS, long_named_runs
    result = runner.invoke(
        app_cli(),
        ["compare", *map(str, runs), "--out", str(tmp_path / "cmp")],
        env={"COLUMNS": str(columns)},
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    table_lines = [line for line in lines if "–" in line or "r=" in line]
    assert all(len(line) <= columns for line in table_lines), "\n".join(table_lines)
    assert "…" not in result.stdout
    words = set(result.stdout.split())
    for name in names:
        assert name in words or f"{name}:" in words, name
    for method in methods:
        assert method in words, method
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    for row in table.itertuples():
        ci = "–".join(f"{v:.2f}".removeprefix("0") for v in (row.auc_ci_low, row.auc_ci_high))
        assert ci in words, ci
        assert f"{row.auc:.3f}" in result.stdout


def app_cli():
    from bidistill.cli import app

    return app
