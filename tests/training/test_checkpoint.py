"""Save → load → the same predictions; refusing what cannot be loaded."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from bidistill.cohort import load_cohort, resolve_splits
from bidistill.config import MethodConfig
from bidistill.errors import CheckpointError
from bidistill.features import FeatureStore
from bidistill.inference import load_trained, predict_bags
from bidistill.training.data import StoreBags

from .conftest import fast_config, train_method


def saved_test_patients(method_dir, config, cohort):
    """A trained method's saved test predictions, its test patients' bags and clinical rows."""
    saved = pd.read_csv(method_dir / "predictions.csv", dtype={"patient_id": str})
    test = saved[saved["split"] == "test"]
    ids = test["patient_id"].tolist()
    store = FeatureStore(config.features.dir, cohort.slides["slide_id"].tolist())
    slides = {p: list(s) for p, s in cohort.slides.groupby("patient_id")["slide_id"]}
    bags = StoreBags(store, [slides[p] for p in ids])
    return test, [bags(i) for i in range(len(ids))], cohort.subset(ids)[cohort.feature_names]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bd", "kd", "clinical-only"])
def test_loaded_method_reproduces_the_saved_predictions(trained_run, tiny_cohort, name):
    method, encoder, meta = load_trained(trained_run / name)
    assert not method.training and meta["method"] == name
    config = fast_config(tiny_cohort)
    test, bag_list, rows = saved_test_patients(
        trained_run / name, config, load_cohort(config.cohort)
    )

    # a small memory budget: bags are encoded in chunks of about 15 instances
    present = predict_bags(method, bag_list, encoder.transform(rows), memory_budget=2**16)
    absent = predict_bags(method, bag_list, encoder.missing_row(len(test)))
    np.testing.assert_allclose(present.probabilities, test["prob_present"], atol=1e-5)
    np.testing.assert_array_equal(absent.probabilities, test["prob_absent"].astype(np.float32))
    if name == "clinical-only":
        assert present.attention is None
    else:
        assert [len(a) for a in present.attention] == [len(b) for b in bag_list]
        assert all(abs(a.sum() - 1) < 1e-4 for a in present.attention)


@pytest.mark.slow
@pytest.mark.parametrize("start", ["slides", "reads"])
def test_a_slides_start_run_loads_back_and_reproduces_its_predictions(tiny_cohort, tmp_path, start):
    """A method trained with ``clinical_start: slides`` (or ``reads``, whose clinical read is
    saved with it) loads in its last own stage (not a read's stage: the fused prediction) and
    predicts what training saved."""
    config = fast_config(tiny_cohort, epochs=3, patience=3)
    cohort = load_cohort(config.cohort)
    splits = resolve_splits(cohort, config.cohort.splits, tmp_path / "splits.json")
    method_cfg = MethodConfig(name="bd", clinical_start=start)
    method_dir = train_method(config, method_cfg, tmp_path, cohort=cohort, splits=splits)
    method, encoder, _ = load_trained(method_dir)
    assert method.stage == "joint" and method.training_stages()[0].name == "slides"
    assert hasattr(method, "clinical_read") == (start == "reads")
    test, bag_list, rows = saved_test_patients(method_dir, config, cohort)
    present = predict_bags(method, bag_list, encoder.transform(rows))
    absent = predict_bags(method, bag_list, encoder.missing_row(len(test)))
    np.testing.assert_allclose(present.probabilities, test["prob_present"], atol=1e-5)
    np.testing.assert_allclose(absent.probabilities, test["prob_absent"], atol=1e-5)


@pytest.mark.slow
def test_checkpoint_from_a_newer_version_is_refused(trained_run, tmp_path):
    copy = tmp_path / "wsi-only"
    shutil.copytree(trained_run / "wsi-only", copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["bidistill_version"] = "99.0.0"
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="written by bidistill 99.0.0, newer than"):
        load_trained(copy)


@pytest.mark.slow
def test_missing_or_mismatched_files_are_named(trained_run, tmp_path):
    copy = tmp_path / "bd"
    shutil.copytree(trained_run / "bd", copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["options"]["hidden_dim"] = 64  # weights were trained with 128
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model.safetensors: does not fit bd"):
        load_trained(copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        load_trained(copy)
