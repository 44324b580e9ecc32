"""evaluate_run on predictions from known distributions: files, contract columns, behaviour."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bidistill._io import write_csv, write_text
from bidistill.config import EvaluationConfig
from bidistill.evaluation import PredictionsError, evaluate_run
from bidistill.evaluation.inputs import read_method_predictions
from bidistill.evaluation.missing import sweep_split
from bidistill.evaluation.summary import CONTRACT_COLUMNS, summarize

from .synthetic import method_frame, write_run

RUN_FILES = [
    "predictions.csv",
    "metrics.csv",
    "metrics_by_seed.csv",
    "delong.csv",
    "report.html",
    "report.md",
    "figures/auc_vs_missing.png",
    "figures/roc_r0.png",
    "figures/roc_r0.8.png",
    "figures/roc_r1.png",
    "figures/calibration_r0.png",
    "figures/calibration_r1.png",
]
FAST = {"mask_seeds": 4, "bootstrap": 200}


def _config_yaml(methods, **evaluation) -> str:
    lines = [
        "name: synthetic-eval",
        "cohort:",
        "  table: cohort.csv",
        "  patient_column: id",
        "  label: {column: y, positive: ['1']}",
        f"methods: {list(methods)}",
        "evaluation:",
    ]
    lines += [f"  {key}: {value}" for key, value in {**FAST, **evaluation}.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("run"), n_patients=400)
    write_text(
        run / "config.yaml", _config_yaml(["bd", "wsi-only", "fusion-zero", "clinical-only"])
    )
    evaluate_run(run)
    return run


def test_writes_every_file_with_the_contract_columns(run_dir) -> None:
    for name in RUN_FILES:
        assert (run_dir / name).stat().st_size > 0, name
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.columns[: len(CONTRACT_COLUMNS)]) == CONTRACT_COLUMNS
    assert len(metrics) == 4 * 6  # one row per (method, rate)
    assert metrics.groupby("method").size().eq(6).all()
    assert (metrics.n_patients == 100).all()
    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert list(predictions.columns) == [
        "patient",
        "method",
        "missing_rate",
        "mask_seed",
        "clinical_present",
        "label",
        "probability",
    ]
    assert len(predictions) == 4 * 6 * 4 * 100
    by_seed = pd.read_csv(run_dir / "metrics_by_seed.csv")
    assert len(by_seed) == 4 * 6 * 4
    # metrics.csv is the mean over mask seeds of metrics_by_seed.csv.
    mean = by_seed.groupby(["method", "missing_rate"])[["auc", "f1"]].mean()
    merged = metrics.merge(
        mean.reset_index(), on=["method", "missing_rate"], suffixes=("", "_seeds")
    )
    np.testing.assert_allclose(merged.auc, merged.auc_seeds)
    np.testing.assert_allclose(merged.f1, merged.f1_seeds)


def test_numbers_behave_as_the_score_distributions_say(run_dir) -> None:
    m = pd.read_csv(run_dir / "metrics.csv").set_index(["method", "missing_rate"])
    # WSI-only ignores clinical data: flat across rates; clinical-only falls to chance at r=1.
    wsi = m.loc["wsi-only", "auc"]
    assert wsi.max() - wsi.min() < 0.02
    assert m.loc[("clinical-only", 1.0), "auc"] == pytest.approx(0.5, abs=0.12)
    # BD degrades gracefully, fusion with zero filling does not.
    assert m.loc[("bd", 1.0), "auc"] > m.loc[("fusion-zero", 1.0), "auc"]
    # No seed variation where masks cannot vary (nobody or everybody masked).
    assert m.loc[("bd", 0.0), "auc_std"] == 0 and m.loc[("bd", 1.0), "auc_std"] == 0
    assert m.loc[("bd", 0.6), "auc_std"] > 0
    assert (m.auc_ci_low < m.auc).all() and (m.auc < m.auc_ci_high).all()
    delong = pd.read_csv(run_dir / "delong.csv")
    assert set(delong.method) == {"wsi-only", "fusion-zero", "clinical-only"}
    strong = delong[(delong.method == "clinical-only") & (delong.missing_rate == 1.0)]
    assert strong.p_holm.iloc[0] < 0.001
    assert (delong.p_holm >= delong.p_value).all()


def test_same_input_gives_identical_files(run_dir, tmp_path) -> None:
    again = write_run(tmp_path, n_patients=400)
    (again / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    evaluate_run(again)
    for name in ("metrics.csv", "metrics_by_seed.csv", "delong.csv", "predictions.csv"):
        assert (again / name).read_bytes() == (run_dir / name).read_bytes(), name


def test_threshold_comes_from_validation_not_test(tmp_path) -> None:
    # Shift the test probabilities only: a validation-chosen threshold does not move.
    frame = method_frame("bd", n_patients=300)
    shifted = frame.copy()
    test = shifted.split == "test"
    shifted.loc[test, ["prob_present", "prob_absent"]] **= 3
    cfg = EvaluationConfig(mask_seeds=2, bootstrap=0)

    def thresholds(f: pd.DataFrame) -> pd.Series:
        preds = {"bd": f}
        args = {"fold": 0, "rates": cfg.missing_rates, "seeds": [0, 1]}
        tables = summarize(
            [sweep_split(preds, split="test", **args)],
            [sweep_split(preds, split="val", **args)],
            cfg,
        )
        return tables.metrics.set_index("missing_rate")["threshold"]

    pd.testing.assert_series_equal(thresholds(frame), thresholds(shifted))


def test_fixed_threshold_and_no_bootstrap(tmp_path) -> None:
    run = write_run(tmp_path, methods=("bd", "wsi-only"), n_patients=200)
    write_text(run / "config.yaml", _config_yaml(["bd", "wsi-only"], threshold=0.3, bootstrap=0))
    metrics = evaluate_run(run).metrics
    assert (metrics.threshold == 0.3).all()
    assert metrics.auc_ci_low.isna().all()


def test_kfold_predictions_give_fold_spread(tmp_path) -> None:
    run = tmp_path
    for method in ("bd", "wsi-only"):
        write_csv(run / method / "predictions.csv", method_frame(method, folds=3))
    write_text(run / "config.yaml", _config_yaml(["bd", "wsi-only"]))
    tables = evaluate_run(run)
    assert (tables.metrics.n_folds == 3).all()
    assert (tables.metrics.auc_fold_std > 0).all()
    assert set(tables.by_seed.fold) == {0, 1, 2}
    assert "fold" in pd.read_csv(run / "predictions.csv").columns


def test_without_config_evaluates_every_method_folder(tmp_path) -> None:
    write_run(tmp_path, methods=("bd", "wsi-only"), n_patients=160)
    assert set(evaluate_run(tmp_path).metrics.method) == {"bd", "wsi-only"}


def test_configured_method_without_predictions_is_named(tmp_path) -> None:
    write_run(tmp_path, methods=("bd",))
    write_text(tmp_path / "config.yaml", _config_yaml(["bd", "wsi-only"]))
    with pytest.raises(
        PredictionsError, match=r"no predictions.csv for method\(s\) \['wsi-only'\]"
    ):
        evaluate_run(tmp_path)


def test_reads_predictions_written_by_pandas_with_bool_strings(tmp_path) -> None:
    path = tmp_path / "predictions.csv"
    method_frame("bd").to_csv(path, index=False)  # True/False as text
    frame = read_method_predictions(path)
    assert frame.clinical_available.dtype == bool
    assert (~frame.clinical_available).sum() == 6
