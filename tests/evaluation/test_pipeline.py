"""`bidistill run` end to end on a small synthetic cohort, with real training (few epochs)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from bidistill.cli import app
from bidistill.config import dump_config, load_config
from bidistill.errors import ConfigError
from bidistill.experiment import run_experiment
from bidistill.synthetic.features import make_feature_cohort

RUN_FILES = [
    "config.yaml",
    "splits.json",
    "cohort.json",
    "predictions.csv",
    "metrics.csv",
    "metrics_by_seed.csv",
    "delong.csv",
    "report.html",
    "report.md",
    "run.log",
    "run.json",
    "figures/auc_vs_missing.png",
    "figures/roc_r0.png",
    "figures/roc_r0.8.png",
    "figures/roc_r1.png",
    "figures/calibration_r0.png",
    "figures/calibration_r1.png",
    "bd/model.safetensors",
    "bd/predictions.csv",
]


def _cohort(tmp_path, *, methods, **overrides) -> object:
    config = make_feature_cohort(tmp_path / "cohort", patients=90, dim=16, instances=(8, 24))
    raw = yaml.safe_load(config.read_text())
    raw["methods"] = methods
    raw["training"].update(epochs=2, patience=2, batch_size=16)
    raw["evaluation"] = {"mask_seeds": 3, "bootstrap": 100}
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    config.write_text(yaml.safe_dump(raw))
    return config


def assert_metrics_follow_the_predictions(out) -> None:
    """metrics.csv's AUCs are scikit-learn's on the run's predictions.csv (mean over folds and
    mask seeds), and the sweep's probabilities are the methods' own: at r = 0 each test patient's
    prob_present where it has clinical data (prob_absent where not), at r = 1 prob_absent."""
    metrics = pd.read_csv(out / "metrics.csv")
    sweep = pd.read_csv(out / "predictions.csv", dtype={"patient": str})
    folds = ["fold"] if "fold" in sweep else []
    per_seed = sweep.groupby(["method", "missing_rate", *folds, "mask_seed"]).apply(
        lambda g: roc_auc_score(g["label"], g["probability"]), include_groups=False
    )
    expected = per_seed.groupby(["method", "missing_rate"]).mean()
    got = metrics.set_index(["method", "missing_rate"])["auc"]
    assert set(got.index) == set(expected.index)
    np.testing.assert_allclose(got.sort_index(), expected.sort_index(), rtol=0, atol=1e-9)
    for method in metrics["method"].unique():
        own = _method_predictions(out, method)
        for rate, column in ((0.0, None), (1.0, "prob_absent")):
            rows = sweep[(sweep["method"] == method) & (sweep["missing_rate"] == rate)]
            merged = rows.merge(own, left_on=[*folds, "patient"], right_on=[*folds, "patient_id"])
            assert len(merged) == len(rows) > 0
            if column is None:
                assert (merged["clinical_present"] == merged["clinical_available"]).all()
                column_values = np.where(
                    merged["clinical_available"], merged["prob_present"], merged["prob_absent"]
                )
            else:
                assert not merged["clinical_present"].any()
                column_values = merged[column]
            np.testing.assert_allclose(merged["probability"], column_values, rtol=1e-6)


def _method_predictions(out, method: str) -> pd.DataFrame:
    """The test rows of a method's own predictions.csv (of every fold in k-fold runs)."""
    paths = sorted(out.glob(f"folds/fold*/{method}/predictions.csv")) or [
        out / method / "predictions.csv"
    ]
    frame = pd.concat([pd.read_csv(p, dtype={"patient_id": str}) for p in paths])
    return frame[frame["split"] == "test"]


@pytest.mark.slow
def test_run_writes_the_run_directory_and_resumes(tmp_path) -> None:
    config = _cohort(tmp_path, methods=["bd", "wsi-only"])
    out = tmp_path / "run"
    result = run_experiment(config, out, progress=False)
    assert result.trained == ["bd", "wsi-only"] and result.evaluated
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert set(result.metrics.method) == {"bd", "wsi-only"}
    assert_metrics_follow_the_predictions(out)
    predictions = pd.read_csv(out / "predictions.csv")
    test_patients = len(yaml.safe_load((out / "splits.json").read_text())["test"])
    assert len(predictions) == 2 * 6 * 3 * test_patients

    # A second call finds everything done.
    report_time = (out / "report.html").stat().st_mtime_ns
    again = run_experiment(config, out, progress=False)
    assert again.trained == [] and not again.evaluated
    assert (out / "report.html").stat().st_mtime_ns == report_time

    # An added method is the only one trained; then everything is evaluated again.
    raw = yaml.safe_load(config.read_text())
    raw["methods"].append("clinical-only")
    config.write_text(yaml.safe_dump(raw))
    added = run_experiment(config, out, progress=False)
    assert added.trained == ["clinical-only"] and added.evaluated
    assert set(added.metrics.method) == {"bd", "wsi-only", "clinical-only"}

    # Settings that only change speed (another machine, more workers) resume the same run.
    raw["training"]["num_workers"] = 1
    raw["training"]["in_memory"] = "no"
    config.write_text(yaml.safe_dump(raw))
    resumed = run_experiment(config, out, progress=False)
    assert resumed.trained == [] and not resumed.evaluated

    # Other training settings would mix two experiments in one folder: refused.
    raw["training"]["epochs"] = 3
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="other training settings"):
        run_experiment(config, out, progress=False)


@pytest.mark.slow
def test_kfold_and_train_time_missingness(tmp_path) -> None:
    config = _cohort(tmp_path, methods=["bd"])
    raw = yaml.safe_load(config.read_text())
    raw["cohort"]["splits"] = {"mode": "kfold", "folds": 2}
    config.write_text(yaml.safe_dump(raw))
    result = run_experiment(config, tmp_path / "cv", progress=False)
    assert (result.metrics.n_folds == 2).all()
    assert (tmp_path / "cv" / "folds" / "fold1" / "bd" / "model.safetensors").is_file()
    assert_metrics_follow_the_predictions(tmp_path / "cv")

    raw["cohort"]["splits"] = {"mode": "table"}
    raw["evaluation"]["train_missing_rates"] = [0.5]
    config.write_text(yaml.safe_dump(raw))
    grid = run_experiment(config, tmp_path / "grid", progress=False)
    assert "train_missing/0.5/bd" in grid.trained
    table = pd.read_csv(tmp_path / "grid" / "train_missing.csv")
    assert set(table.train_missing_rate) == {0.5} and len(table) == 6
    stripped = pd.read_csv(tmp_path / "grid" / "train_missing" / "0.5" / "bd" / "predictions.csv")
    train = stripped[stripped.split == "train"]
    assert 0.45 < 1 - train.clinical_available.mean() < 0.6  # half (+ genuinely missing)
    assert stripped[stripped.split == "test"].clinical_available.mean() > 0.85
    # A rerun finds the grid done: nothing trained, its report not rewritten.
    grid_report = tmp_path / "grid" / "train_missing" / "0.5" / "report.html"
    before = grid_report.stat().st_mtime_ns
    again = run_experiment(config, tmp_path / "grid", progress=False)
    assert again.trained == [] and grid_report.stat().st_mtime_ns == before


@pytest.mark.slow
def test_cli_run_says_what_it_does_and_what_it_skips(tmp_path) -> None:
    config = _cohort(tmp_path, methods=["wsi-only"])
    out = tmp_path / "run"
    runner = CliRunner()
    first = runner.invoke(app, ["run", str(config), "--out", str(out), "--no-progress"])
    assert first.exit_code == 0, first.output
    assert "loading the cohort table" in first.stderr and "wsi-only: training" in first.stderr
    again = runner.invoke(app, ["run", str(config), "--out", str(out), "--no-progress"])
    assert again.exit_code == 0, again.output
    # A resumed run says at once what it found done, on the console (not only in run.log).
    lines = again.stderr.splitlines()
    assert lines[0].startswith("loading the cohort table")
    assert "up to date in this run, kept: wsi-only" in again.stderr
    assert "evaluate: up to date" in again.stderr
    assert f"report: {out / 'report.html'}" in again.stderr
    assert again.stderr.strip().splitlines()[-1].startswith(f"next: bidistill predict --run {out}")


def test_cli_evaluate_prints_the_table_and_fails_cleanly(tmp_path) -> None:
    from .synthetic import write_run

    write_run(tmp_path / "run", methods=("bd", "wsi-only"), n_patients=120)
    runner = CliRunner()
    ok = runner.invoke(app, ["evaluate", str(tmp_path / "run")])
    assert ok.exit_code == 0, ok.output
    assert "wsi-only" in ok.output and "r=0.8" in ok.output
    empty = runner.invoke(app, ["evaluate", str(tmp_path / "nothing")])
    assert empty.exit_code == 1
    assert "no <method>/predictions.csv to evaluate" in " ".join(empty.output.split())
    assert "Traceback" not in empty.output


def test_changed_options_of_a_trained_method_are_refused(tmp_path) -> None:
    config = _cohort(tmp_path, methods=[{"name": "bd", "lambda_kd": 0.5}])
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(dump_config(load_config(config)))
    (out / "bd").mkdir()  # trained (or training) with lambda_kd 0.5
    raw = yaml.safe_load(config.read_text())
    raw["methods"] = [{"name": "bd", "lambda_kd": 1.0}]
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="method 'bd' was trained with other options"):
        run_experiment(config, out, progress=False)


@pytest.mark.slow
def test_train_writes_the_folds_where_run_keeps_them(tmp_path) -> None:
    """`bidistill train --fold k` and `bidistill run` share one layout and one record: folds
    trained one by one are joined once all are there, and `run` then trains nothing again."""
    config = _cohort(
        tmp_path, methods=["wsi-only"], cohort={"splits": {"mode": "kfold", "folds": 2}}
    )
    out = tmp_path / "run"
    runner = CliRunner()
    first = runner.invoke(app, ["train", str(config), "--out", str(out), "--fold", "0"])
    assert first.exit_code == 0, first.output
    assert f"wsi-only: {out / 'folds' / 'fold0' / 'wsi-only'}" in first.output
    assert (out / "folds" / "fold0" / "wsi-only" / "predictions.csv").is_file()
    assert not (out / "wsi-only").exists()  # joined once every fold is trained
    second = runner.invoke(app, ["train", str(config), "--out", str(out), "--fold", "1"])
    assert second.exit_code == 0, second.output
    joined = pd.read_csv(out / "wsi-only" / "predictions.csv")
    assert set(joined["fold"]) == {0, 1}
    again = runner.invoke(app, ["train", str(config), "--out", str(out), "--fold", "1"])
    assert again.exit_code == 0, again.output
    assert "up to date in this run, kept: wsi-only" in again.output  # the same record as run
    result = run_experiment(config, out, progress=False)
    assert result.trained == [] and result.evaluated
    assert (result.metrics.n_folds == 2).all()
