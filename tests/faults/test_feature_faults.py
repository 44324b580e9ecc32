"""Feature files that break the contract: caught when the store opens, before any training,
with the file named; a method whose predictions are NaN is never marked done."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from bidistill.features import feature_path, write_feature_file

from .conftest import (
    Snapshot,
    assert_one_line_error,
    invoke,
    slide_of_split,
    small_cohort,
    table,
)


def _rewrite(path, features, *, coords=None):
    """Replace a feature file with raw datasets (as a foreign or broken tool would write)."""
    path.unlink()
    with h5py.File(path, "w") as h5:
        h5.create_dataset("features", data=features)
        h5.create_dataset("coords", data=coords if coords is not None else np.zeros((1, 2)))
        h5.attrs.update(encoder="synthetic", patch_size=256, mpp=0.5, level=0)


def _nan(path, value=np.nan):
    with h5py.File(path, "r") as h5:
        features = h5["features"][()]
    features[1, 2] = value
    _rewrite(path, features)


def _huge(path):
    path.unlink()
    with h5py.File(path, "w") as h5:  # declares 1e11 x 8 floats; stores almost nothing
        h5.create_dataset("features", shape=(10**11, 8), dtype="float32", chunks=(1024, 8))
        h5.create_dataset("coords", data=np.zeros((1, 2)))


# (case, how the file is broken, fragments of the error line)
BROKEN = [
    ("nan", _nan, ["NaN or infinite values", "the first at row 1"]),
    ("inf", lambda p: _nan(p, np.inf), ["NaN or infinite values"]),
    ("integers", lambda p: _rewrite(p, np.ones((5, 8), "int64")), ["hold int64 values"]),
    ("one-d", lambda p: _rewrite(p, np.ones(8, "float32")), ["got shape (8,)", "1-D array"]),
    ("rank-3", lambda p: _rewrite(p, np.ones((2, 5, 8), "float32")), ["got shape (2, 5, 8)"]),
    ("no-instances", lambda p: _rewrite(p, np.ones((0, 8), "float32")), ["no instances"]),
    ("declares-1e11-rows", _huge, ["declares 100,000,000,000 x 8 features"]),
]


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("breaks,fragments", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_feature_file_fails_before_training(tmp_path, split, breaks, fragments):
    config = small_cohort(tmp_path / "cohort")
    bad = feature_path(config.parent / "features", slide_of_split(config, split))
    breaks(bad)
    snapshot = Snapshot(tmp_path / "cohort")
    result = invoke("run", config, "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(result, str(bad), *fragments)
    assert not any((tmp_path / "run").glob("*/model.safetensors"))  # failed before training
    snapshot.assert_nothing_lost()


def test_lazy_store_scans_values_when_it_opens(tmp_path):
    from bidistill.errors import FeatureFileError
    from bidistill.features import FeatureStore

    for i in range(3):
        features = np.ones((40, 4), "float32")
        if i == 2:
            features[39, 3] = np.nan
        write_feature_file(
            tmp_path / f"S{i}.h5", features, np.zeros((40, 2)), encoder="x", patch_size=1, mpp=1
        )
    with pytest.raises(FeatureFileError, match=r"S2\.h5: .*the first at row 39"):
        FeatureStore(tmp_path, ["S0", "S1", "S2"], in_memory="no")


def test_a_fixed_feature_file_lets_the_rerun_go_through(tmp_path):
    config = small_cohort(tmp_path / "cohort", methods=["wsi-only"])
    bad = feature_path(config.parent / "features", slide_of_split(config, "test"))
    original = bad.read_bytes()
    _nan(bad)
    failed = invoke("run", config, "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(failed, str(bad))
    bad.write_bytes(original)  # fixed: nothing has to be deleted by hand
    fixed = invoke("run", config, "--out", tmp_path / "run", "--no-progress")
    assert fixed.exit_code == 0, fixed.output
    # The repaired slide's patient is predicted like every other, and the run is evaluated.
    rows = table(config)
    patient = rows.loc[rows["slide_id"] == bad.stem, "patient_id"].iloc[0]
    predictions = pd.read_csv(tmp_path / "run" / "wsi-only" / "predictions.csv", dtype=str)
    assert sorted(predictions["patient_id"]) == sorted(rows["patient_id"].unique())
    mine = predictions.set_index("patient_id").loc[patient]
    assert mine["split"] == "test" and np.isfinite(float(mine["prob_present"]))
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert sorted(zip(metrics["method"], metrics["missing_rate"])) == [
        ("wsi-only", 0.0),
        ("wsi-only", 1.0),
    ]


def test_nan_predictions_never_mark_a_method_done(tmp_path, monkeypatch):
    import bidistill.training.train as train_module

    config = small_cohort(tmp_path / "cohort", methods=["wsi-only"])
    real = train_module.predictions_table

    def diverged(method, source, fold):
        table = real(method, source, fold)
        table.loc[0, "prob_present"] = np.nan  # what weights gone NaN would give
        return table

    monkeypatch.setattr(train_module, "predictions_table", diverged)
    result = invoke("run", config, "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(result, "wsi-only: predictions are NaN for", "not done")
    assert not (tmp_path / "run" / "wsi-only" / "predictions.csv").exists()
    monkeypatch.setattr(train_module, "predictions_table", real)
    again = invoke("run", config, "--out", tmp_path / "run", "--no-progress")
    assert again.exit_code == 0, again.output
    assert "wsi-only: training" in again.output  # trained again, not skipped
