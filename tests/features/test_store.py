"""The .h5 feature store: contract layout, CLAM/TRIDENT compatibility, atomic writes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from bidistill import __version__
from bidistill.errors import FeatureFileError
from bidistill.features.store import feature_dim, read_feature_file, write_feature_file


def test_round_trip_with_contract_attributes(tmp_path):
    features = np.random.default_rng(0).normal(size=(7, 457)).astype(np.float16)
    coords = np.arange(14).reshape(7, 2) * 256
    path = write_feature_file(
        tmp_path / "s.h5", features, coords, encoder="uni", patch_size=256, mpp=0.5
    )
    with h5py.File(path) as h5:  # the layout other tools read
        assert h5["features"].dtype == np.float16 and h5["coords"].dtype == np.int64
        assert h5.attrs["encoder"] == "uni" and h5.attrs["bidistill_version"] == __version__
    back = read_feature_file(path)
    np.testing.assert_array_equal(back.features, features)
    np.testing.assert_array_equal(back.coords, coords)
    assert back.attrs["mpp"] == 0.5 and back.attrs["level"] == 0
    assert feature_dim(path) == 457


def test_reads_clam_style_file_without_our_attributes(tmp_path):
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as h5:  # CLAM's older [1, n, D] layout, no attrs
        h5["features"] = np.ones((1, 5, 3), np.float32)
        h5["coords"] = np.zeros((1, 5, 2), np.int64)
    f = read_feature_file(path)
    assert f.features.shape == (5, 3) and f.coords.shape == (5, 2)


def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "s.h5"
    good = np.zeros((2, 3), np.float32)
    write_feature_file(path, good, np.zeros((2, 2)), encoder="e", patch_size=1, mpp=1)
    with pytest.raises(FeatureFileError, match="coords must be"):
        write_feature_file(path, good, np.zeros((3, 2)), encoder="e", patch_size=1, mpp=1)
    assert read_feature_file(path).features.shape == (2, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FeatureFileError, match="absent.h5: feature file not found"):
        read_feature_file(tmp_path / "absent.h5")
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(FeatureFileError, match="junk.h5: not a readable HDF5 file"):
        read_feature_file(junk)
    with pytest.raises(FeatureFileError, match="float32/float16"):
        write_feature_file(
            tmp_path / "x.h5",
            np.zeros((2, 2), np.int32),
            np.zeros((2, 2)),
            encoder="e",
            patch_size=1,
            mpp=1,
        )


def test_written_files_get_the_umask_mode_not_a_private_one(tmp_path):
    path = write_feature_file(
        tmp_path / "s.h5",
        np.zeros((1, 2), np.float32),
        np.zeros((1, 2)),
        encoder="e",
        patch_size=1,
        mpp=1,
    )
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
