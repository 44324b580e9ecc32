"""Features from another encoder, patch size or MPP than the run's are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import bidistill
from bidistill.features.identity import FeatureIdentity, read_identity
from bidistill.inference.feature_source import FeatureIdentityError, run_identity

from .helpers import altered_copy

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"encoder": "uni"}, "encoder 'uni' \\(the run's: 'synthetic'\\)"),
        ({"patch_size": 512}, "patch_size 512 \\(the run's: 256\\)"),
        ({"mpp": 0.25}, "mpp 0.25 \\(the run's: 0.5\\)"),
    ],
)
def test_features_of_another_kind_are_refused(demo_run, demo_cohort, tmp_path, attrs, message):
    new = altered_copy(demo_cohort / "features" / "S0000.h5", tmp_path / "S0000.h5", **attrs)
    run = bidistill.load_run(demo_run)
    with pytest.raises(
        FeatureIdentityError, match=f"S0000.h5: features of another kind.*{message}"
    ):
        run.predict(new)


def test_what_a_file_does_not_record_is_not_compared(demo_run, demo_cohort, tmp_path):
    source = demo_cohort / "features" / "S0000.h5"
    # CLAM writes no attributes; a scanner's MPP differs in the last digits
    clam = altered_copy(
        source, tmp_path / "a" / "S0000.h5", encoder=None, patch_size=None, mpp=None
    )
    close = altered_copy(source, tmp_path / "b" / "S0000.h5", mpp=0.5035)
    run = bidistill.load_run(demo_run)
    expected = run.predict(source)["probability"]
    for path in (clam, close):
        np.testing.assert_allclose(run.predict(path)["probability"], expected)


def test_trident_attributes_on_coords_are_read(tmp_path):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as h5:
        h5["features"] = np.zeros((3, 4), np.float32)
        coords = h5.create_dataset("coords", data=np.zeros((3, 2), np.int64))
        coords.attrs.update({"patch_size": 256, "target_magnification": 40, "encoder": "conch"})
    found = read_identity(path)
    assert found == FeatureIdentity(encoder="conch", patch_size=256, mpp=0.25)
    assert found.disagreements(FeatureIdentity(mpp=0.5, encoder="conch")) == {"mpp": (0.25, 0.5)}


def test_a_recorded_identity_is_compared_key_by_key(demo_cohort):
    recorded = {"encoder": "x", "weights_sha256": "ab", "future_key": 1}
    identity, source = run_identity({"features": {"identity": recorded}}, Path("r/bd/model.json"))
    assert source == str(Path("r/bd/model.json"))
    assert identity.disagreements(FeatureIdentity(encoder="x", weights_sha256="cd", mpp=1.0)) == {
        "weights_sha256": ("ab", "cd")
    }
    # no identity recorded: the run's training files, else its config
    meta = {"features": {"dir": str(demo_cohort / "features"), "encoder": "resnet50-trunc"}}
    identity, source = run_identity(meta, Path("m.json"))
    assert identity == FeatureIdentity(encoder="synthetic", patch_size=256, mpp=0.5)
    assert "training features" in source
    gone = {"features": {"dir": str(demo_cohort / "nowhere"), "encoder": "resnet50-trunc"}}
    assert run_identity(gone, Path("m.json")) == (
        FeatureIdentity(encoder="resnet50-trunc"),
        "the run's config (features.encoder)",
    )


def test_another_feature_dimension_is_refused(demo_run, tmp_path):
    path = tmp_path / "S1.h5"
    with h5py.File(path, "w") as h5:
        h5["features"] = np.zeros((5, 31), np.float32)
        h5["coords"] = np.zeros((5, 2), np.int64)
        h5.attrs.update({"encoder": "synthetic", "patch_size": 256, "mpp": 0.5})
    with pytest.raises(FeatureIdentityError, match="feature dimension 31 \\(the run's: 32\\)"):
        bidistill.load_run(demo_run).predict(path)


def test_the_run_identity_survives_a_moved_feature_folder(demo_run, demo_cohort, tmp_path):
    """A run that recorded no identity (made before bidistill recorded it) and whose training
    folder is gone falls back to its config's encoder name."""
    copy = tmp_path / "run"
    shutil.copytree(demo_run / "bd", copy / "bd")
    shutil.copy(demo_run / "config.yaml", copy / "config.yaml")
    meta = json.loads((copy / "bd" / "model.json").read_text())
    meta["features"]["dir"] = str(tmp_path / "moved")
    meta["features"].pop("identity", None)
    (copy / "bd" / "model.json").write_text(json.dumps(meta))
    run = bidistill.load_run(copy)
    assert run.source.identity == FeatureIdentity(encoder="synthetic")
    other = altered_copy(
        demo_cohort / "features" / "S0000.h5", tmp_path / "S0000.h5", encoder="uni"
    )
    with pytest.raises(FeatureIdentityError, match="from the run's config"):
        run.predict(other)
