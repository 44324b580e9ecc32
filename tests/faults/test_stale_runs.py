"""Run fingerprints: a rerun redoes exactly the stages whose inputs changed, and says so."""

from __future__ import annotations

import json

import h5py
import pandas as pd
import pytest

from bidistill.features import feature_path
from bidistill.models.base import MethodOptions
from bidistill.models.registry import resolved_options
from bidistill.runs.fingerprint import digest

from .conftest import edit_config, invoke, slide_of_split, table


def _rerun(config, run_dir):
    result = invoke("run", config, "--out", run_dir, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


def _finished(run_dir) -> dict[str, str]:
    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    return {name: record["finished"] + str(record["inputs"]) for name, record in stages.items()}


def test_unchanged_rerun_in_a_moved_folder_redoes_nothing(run_copy):
    config, run_dir = run_copy
    metrics = (run_dir / "metrics.csv").read_bytes()
    report = (run_dir / "report.html").stat().st_mtime_ns
    output = _rerun(config, run_dir)
    assert "up to date in this run, kept: wsi-only, clinical-only" in output
    assert "evaluate: up to date" in output
    assert "training" not in output
    assert (run_dir / "metrics.csv").read_bytes() == metrics
    assert (run_dir / "report.html").stat().st_mtime_ns == report
    assert "label 'nodal_status': value → class (patients)" in output  # before any work


def test_relabelled_patients_retrain_every_method_and_update_the_results(run_copy):
    config, run_dir = run_copy
    rows = table(config)
    relabel = rows.loc[rows["nodal_status"] == "N0", "patient_id"].iloc[:8].tolist()
    rows.loc[rows["patient_id"].isin(relabel), "nodal_status"] = "N+"
    rows.to_csv(config.parent / "cohort.csv", index=False)
    output = _rerun(config, run_dir)
    assert "wsi-only: training again: cohort rows: changed for 8 patient(s)" in output
    assert "clinical-only: training again: cohort rows: changed for 8 patient(s)" in output
    assert "evaluate: evaluating again: predictions: changed for 2 method(s)" in output
    predictions = pd.read_csv(run_dir / "wsi-only" / "predictions.csv", dtype={"patient_id": str})
    assert (predictions.set_index("patient_id").loc[relabel, "label"] == 1).all()
    long = pd.read_csv(run_dir / "predictions.csv", dtype={"patient": str, "patient_id": str})
    id_column = "patient_id" if "patient_id" in long else "patient"
    relabelled_test = long[long[id_column].isin(relabel)]
    assert relabelled_test.empty or (relabelled_test["label"] == 1).all()


def test_a_changed_feature_file_retrains_only_the_methods_that_read_it(run_copy):
    config, run_dir = run_copy
    slide = slide_of_split(config, "train")
    path = feature_path(config.parent / "features", slide)
    with h5py.File(path, "a") as h5:
        h5["features"][0, 0] += 1.0
    before = _finished(run_dir)
    output = _rerun(config, run_dir)
    assert f"wsi-only: training again: feature files: changed for 1 slide(s) ({slide})" in output
    assert "up to date in this run, kept: clinical-only" in output
    after = _finished(run_dir)
    assert after["clinical-only"] == before["clinical-only"]
    assert after["wsi-only"] != before["wsi-only"]


@pytest.fixture
def new_default_bag_layers():
    """As if a new version of the tool changed a default: ``bag_layers`` 0 → 1, restored after."""
    field = MethodOptions.model_fields["bag_layers"]
    field.default = 1
    MethodOptions.model_rebuild(force=True)
    yield
    field.default = 0
    MethodOptions.model_rebuild(force=True)


def test_a_changed_default_retrains_the_methods_that_leave_it_to_the_default(
    run_copy, new_default_bag_layers
):
    """The config is the same, but ``{name: wsi-only}`` now means another model: retrained (a
    run left to the old default would differ from a fresh run of the same config)."""
    config, run_dir = run_copy
    before = _finished(run_dir)
    output = _rerun(config, run_dir)
    assert "wsi-only: training again: its options (defaults included) changed" in output
    assert _finished(run_dir)["wsi-only"] != before["wsi-only"]
    model = json.loads((run_dir / "wsi-only" / "model.json").read_text())
    assert model["options"]["bag_layers"] == 1
    assert "training" not in _rerun(config, run_dir)


def test_an_option_a_new_version_adds_retrains_nothing_at_its_value_of_before(run_copy):
    """A run made before ``instance_layers`` existed recorded every option but it; at 1 the
    new version trains the model of before, so the run is kept (the record compares equal);
    a config that asks for 2 is another model and retrains."""
    config, run_dir = run_copy
    before_the_option = resolved_options("wsi-only", {})
    assert before_the_option.pop("instance_layers") == 1
    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    recorded = [r["inputs"]["options"] for name, r in stages.items() if "wsi-only" in name]
    assert recorded == [digest(before_the_option)]
    assert "training" not in _rerun(config, run_dir)
    edit_config(config, lambda raw: raw["methods"].append({"name": "wsi-only", "label": "deep"}))
    edit_config(config, lambda raw: raw["methods"][-1].update(instance_layers=2))
    output = _rerun(config, run_dir)
    assert "deep: training" in output and "wsi-only: training" not in output


def test_changed_evaluation_settings_redo_only_the_evaluation(run_copy):
    config, run_dir = run_copy
    edit_config(config, lambda raw: raw["evaluation"].update(bootstrap=30))
    output = _rerun(config, run_dir)
    assert "evaluate: evaluating again: evaluation settings changed" in output
    assert "training" not in output


def test_a_deleted_report_is_made_again(run_copy):
    config, run_dir = run_copy
    (run_dir / "report.html").unlink()
    output = _rerun(config, run_dir)
    assert "evaluate: evaluating again: report.html is missing" in output
    assert (run_dir / "report.html").is_file()


def test_a_patient_moved_to_another_split_makes_new_splits(run_copy):
    config, run_dir = run_copy
    rows = table(config)
    moved = rows.loc[rows["split"] == "train", "patient_id"].iloc[0]
    rows.loc[rows["patient_id"] == moved, "split"] = "test"
    rows.to_csv(config.parent / "cohort.csv", index=False)
    output = _rerun(config, run_dir)
    assert f"splits: made again: the cohort's patients: changed for 1 patient(s) ({moved})" in (
        output
    )
    assert moved in json.loads((run_dir / "splits.json").read_text())["test"]
    assert "wsi-only: training again: the splits changed" in output


def test_a_method_killed_before_its_predictions_is_the_only_one_retrained(run_copy):
    config, run_dir = run_copy
    (run_dir / "wsi-only" / "predictions.csv").unlink()  # as a kill -9 during training leaves it
    output = _rerun(config, run_dir)
    assert "wsi-only: training again: predictions.csv is missing" in output
    assert "kept: clinical-only" in output
