"""load_run: predictions for new patients reproduce the run's own, with and without clinical
data; thresholds, routing, k-fold runs and refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import bidistill
from bidistill.errors import CheckpointError, CohortError, ConfigError
from bidistill.thresholds import youden_threshold

from .helpers import new_patients_table, saved_predictions

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["bd", "wsi-only", "clinical-only"])
@pytest.mark.parametrize("with_clinical", [True, False], ids=["with-clinical", "without"])
def test_predict_reproduces_the_test_predictions(
    demo_run, demo_cohort, tmp_path, method, with_clinical
):
    """A table without the clinical columns: every patient without clinical data."""
    saved = saved_predictions(demo_run, method)
    clinical = [] if with_clinical else ["age", "tumour_size_cm", "er", "grade", "ki67", "subtype"]
    table = new_patients_table(demo_cohort, tmp_path / "new.csv", drop=clinical)
    predicted = bidistill.load_run(demo_run, method).predict(demo_cohort / "features", table)
    predicted = predicted.set_index("patient_id").loc[saved.index]
    expected = saved["prob_present" if with_clinical else "prob_absent"]
    np.testing.assert_array_equal(
        predicted["probability"].astype(np.float32), expected.astype(np.float32)
    )
    if with_clinical:
        np.testing.assert_array_equal(predicted["clinical_present"], saved["clinical_available"])
    else:
        assert not predicted["clinical_present"].any()
        assert (predicted["clinical_missing"] == ";".join(clinical)).all()


def test_feature_files_alone_are_patients_without_clinical_data(demo_run, demo_cohort):
    saved = saved_predictions(demo_run, "bd")
    files = [demo_cohort / "features" / f"{p.replace('P', 'S')}.h5" for p in saved.index]
    single = [f for f in files if f.is_file()]  # patients with two slides have S....-1/-2
    assert len(single) > 10
    predicted = bidistill.load_run(demo_run).predict(single).set_index("patient_id")
    expected = saved["prob_absent"].rename(lambda p: p.replace("P", "S"))
    np.testing.assert_array_equal(
        predicted["probability"].astype(np.float32),
        expected.loc[predicted.index].astype(np.float32),
    )
    assert set(predicted["branch"]) == {"single-modal"}


def test_decisions_use_the_validation_thresholds_of_each_route(demo_run, demo_cohort):
    run = bidistill.load_run(demo_run)
    assert run.method == "bd" and run.branches == ["multi-modal", "single-modal"]
    val = saved_predictions(demo_run, "bd", "val")
    present = youden_threshold(val["label"].to_numpy(), val["prob_present"].to_numpy())
    absent = youden_threshold(val["label"].to_numpy(), val["prob_absent"].to_numpy())
    table = run.predict(demo_cohort / "features", demo_cohort / "cohort.csv")
    assert len(table) == 120
    expected = np.where(table["clinical_present"], present, absent)
    np.testing.assert_allclose(table["threshold"], expected)
    assert (table["decision"] == (table["probability"] >= table["threshold"])).all()
    assert set(table["predicted"]) == {"N+", "N0"}
    routes = table.groupby("clinical_present")["branch"].unique().to_dict()
    assert routes == {True: ["multi-modal"], False: ["single-modal"]}
    missing = table.set_index("patient_id")["clinical_missing"]
    cohort = pd.read_csv(demo_cohort / "cohort.csv", dtype=str, keep_default_na=False)
    no_ki67 = set(cohort.loc[cohort["ki67"] == "", "patient_id"])
    assert {p for p, m in missing.items() if "ki67" in m.split(";")} == no_ki67


def test_attention_maps_each_patients_bag_back_to_its_slides(demo_run, demo_cohort):
    run = bidistill.load_run(demo_run)
    cohort = pd.read_csv(demo_cohort / "cohort.csv", dtype=str)
    two = cohort.groupby("patient_id")["slide_id"].count().loc[lambda n: n == 2].index[0]
    (patient,) = run.attention(demo_cohort / "features", demo_cohort / "cohort.csv", patients=[two])
    assert len(patient.slides) == 2 and patient.n_tiles == sum(
        len(s.coords) for s in patient.slides
    )
    for branch in run.branches:  # weights of the whole bag, split by slide
        total = sum(s.scores[branch].sum() for s in patient.slides)
        assert total == pytest.approx(1, abs=1e-5)
    slide = patient.slides[0]
    with __import__("h5py").File(slide.feature_file) as h5:
        np.testing.assert_array_equal(slide.coords, h5["coords"][()])
    frame = slide.frame()
    assert list(frame.columns[:5]) == ["tile", "x", "y", "attention", "percentile"]
    assert {"attention_multi-modal", "percentile_single-modal"} <= set(frame.columns)
    assert frame["percentile"].min() == 0 and frame["percentile"].max() == 1


def test_a_kfold_run_predicts_with_the_mean_of_its_fold_models(demo_cohort, tmp_path):
    from bidistill.experiment import run_experiment

    raw = {
        "cohort": {
            "table": str(demo_cohort / "cohort.csv"),
            "patient_column": "patient_id",
            "slide_column": "slide_id",
            "label": {"column": "nodal_status", "positive": ["N+"], "negative": ["N0"]},
            "split_column": "split",
            "splits": {"mode": "kfold", "folds": 2},
            "clinical": [{"column": "age", "kind": "numeric"}],
        },
        "features": {"dir": str(demo_cohort / "features"), "encoder": "synthetic"},
        "methods": ["wsi-only"],
        "training": {"epochs": 2, "device": "cpu"},
        "evaluation": {"mask_seeds": 1, "bootstrap": 0},
    }
    config = tmp_path / "kfold.yaml"
    config.write_text(json.dumps(raw))
    run_experiment(config, tmp_path / "run", progress=False)
    run = bidistill.load_run(tmp_path / "run")
    assert len(run.folds) == 2
    joined = pd.read_csv(
        tmp_path / "run" / "wsi-only" / "predictions.csv", dtype={"patient_id": str}
    )
    test = joined[joined["split"] == "test"]
    expected = test.groupby("patient_id")["prob_present"].mean()
    table = new_patients_table(demo_cohort, tmp_path / "new.csv")
    predicted = run.predict(demo_cohort / "features", table).set_index("patient_id")
    np.testing.assert_allclose(predicted["probability"], expected.loc[predicted.index], atol=1e-5)


def test_a_run_trained_by_a_newer_bidistill_is_refused(demo_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(demo_run / "bd", copy / "bd")
    shutil.copy(demo_run / "config.yaml", copy / "config.yaml")
    meta = json.loads((copy / "bd" / "model.json").read_text())
    meta["bidistill_version"] = "99.0.0"
    (copy / "bd" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="written by bidistill 99.0.0, newer than"):
        bidistill.load_run(copy)


def test_unknown_method_and_missing_config_are_clear_errors(demo_run, tmp_path):
    with pytest.raises(CheckpointError, match="no trained method 'moddrop'; trained: bd, "):
        bidistill.load_run(demo_run, "moddrop")
    copy = tmp_path / "run"
    shutil.copytree(demo_run / "wsi-only", copy / "wsi-only")
    with pytest.raises(ConfigError, match="no config.yaml.*--config"):
        bidistill.load_run(copy)
    run = bidistill.load_run(copy, config=demo_run / "config.yaml")
    assert run.method == "wsi-only"


def test_patients_without_feature_files_or_unknown_ids_are_refused(demo_run, demo_cohort, tmp_path):
    run = bidistill.load_run(demo_run)
    table = pd.DataFrame({"patient_id": ["X1"], "slide_id": ["S9999"], "age": ["50"]})
    with pytest.raises(Exception, match=r"no feature file for slides \['S9999'\]"):
        run.predict(demo_cohort / "features", table)
    with pytest.raises(CohortError, match=r"patients \['P9999'\] not found"):
        run.predict(demo_cohort / "features", demo_cohort / "cohort.csv", patients=["P9999"])
