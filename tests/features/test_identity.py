"""Feature identity: read from ours, TRIDENT's and CLAM's attributes; a store never mixes kinds."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from bidistill.errors import FeatureFileError
from bidistill.features import FeatureStore
from bidistill.features.identity import FeatureIdentity, check_matches, read_identity
from bidistill.features.store import write_feature_file


def _ours(path, *, encoder="uni", digest="aaaa", patch_size=256, mpp=0.5, dim=5):
    write_feature_file(
        path,
        np.ones((3, dim), np.float32),
        np.zeros((3, 2)),
        encoder=encoder,
        patch_size=patch_size,
        mpp=mpp,
        extra_attrs={"encoder_weights_sha256": digest, "random_init": False},
    )
    return path


def _trident(path, *, magnification=20, patch_size=256):
    with h5py.File(path, "w") as h5:  # TRIDENT keeps its attributes on the coords dataset
        h5["features"] = np.ones((3, 5), np.float32)
        coords = h5.create_dataset("coords", data=np.zeros((3, 2), np.int64))
        coords.attrs.update(
            {"patch_size": patch_size, "target_magnification": magnification, "overlap": 0}
        )
    return path


def _clam(path):
    with h5py.File(path, "w") as h5:  # no attributes at all
        h5["features"] = np.ones((3, 5), np.float32)
        h5["coords"] = np.zeros((3, 2), np.int64)
    return path


def test_identity_comes_from_whatever_attributes_a_file_has(tmp_path):
    ours = read_identity(_ours(tmp_path / "a.h5"))
    assert ours == FeatureIdentity("uni", "aaaa", False, 256, 0.5)
    trident = read_identity(_trident(tmp_path / "t.h5"))
    assert trident == FeatureIdentity(patch_size=256, mpp=0.5)  # 20x is 0.5 um/px
    assert read_identity(_clam(tmp_path / "c.h5")) == FeatureIdentity()


def test_a_store_accepts_files_that_agree_on_what_they_state(tmp_path):
    _ours(tmp_path / "a.h5")
    _trident(tmp_path / "b.h5")
    _clam(tmp_path / "c.h5")
    store = FeatureStore(tmp_path, ["a", "b", "c"], in_memory="no")
    assert store.identity == FeatureIdentity("uni", "aaaa", False, 256, 0.5)


@pytest.mark.parametrize(
    ("other", "field"),
    [
        ({"encoder": "resnet50-trunc"}, "encoder=uni but .*b.h5 has encoder=resnet50-trunc"),
        ({"digest": "bbbb"}, "weights_sha256=aaaa but .*b.h5 has weights_sha256=bbbb"),
        ({"mpp": 0.25}, "mpp=0.5 but .*b.h5 has mpp=0.25"),
        ({"patch_size": 224}, "patch_size=256 but .*b.h5 has patch_size=224"),
    ],
)
def test_a_store_refuses_to_mix_and_names_two_disagreeing_files(tmp_path, other, field):
    _ours(tmp_path / "a.h5")
    _ours(tmp_path / "b.h5", **other)
    with pytest.raises(FeatureFileError, match=rf"made differently: .*a\.h5 has {field}"):
        FeatureStore(tmp_path, ["a", "b"], in_memory="no")


def test_trident_magnification_counts_as_mpp(tmp_path):
    _ours(tmp_path / "a.h5")
    _trident(tmp_path / "b.h5", magnification=40)
    with pytest.raises(FeatureFileError, match="mpp=0.5 but .*b.h5 has mpp=0.25"):
        FeatureStore(tmp_path, ["a", "b"], in_memory="no")


def test_check_matches_names_both_sources():
    files = FeatureIdentity("uni", "aaaa", False, 256, 0.5)
    check_matches(files, FeatureIdentity(encoder="uni"), actual_where="x", expected_where="y")
    with pytest.raises(FeatureFileError, match="encoder uni in the files, virchow2 in the run"):
        check_matches(
            files,
            FeatureIdentity(encoder="virchow2"),
            actual_where="the files",
            expected_where="the run",
        )
    assert files.filled_from(FeatureIdentity(encoder="x", mpp=1.0)) == files
    assert FeatureIdentity().filled_from(files) == files
