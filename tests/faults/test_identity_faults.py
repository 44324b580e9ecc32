"""Feature files that disagree on what made them, where the identity sits on the ``features``
dataset (how TRIDENT and other tools record the encoder): refused before any training, with two
files named; and TRIDENT's file for a slide without tiles says to drop the slide."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from bidistill.errors import FeatureFileError
from bidistill.features import FeatureStore, feature_path, read_feature_file
from bidistill.features.identity import common_identity

from ..features.trident import write_trident_features
from .conftest import (
    Snapshot,
    assert_one_line_error,
    edit_config,
    invoke,
    slide_of_split,
    small_cohort,
    table,
)


def _rewrite_half(config, write) -> tuple[list, list]:
    """Rewrite every feature file with ``write(path, features, coords, index)``; returns the
    paths of even and odd rows of the cohort table."""
    paths = [feature_path(config.parent / "features", s) for s in table(config)["slide_id"]]
    for i, path in enumerate(paths):
        got = read_feature_file(path)
        path.unlink()
        write(path, got.features, got.coords, i)
    return paths[0::2], paths[1::2]


def _assert_refused_before_training(tmp_path, config, *fragments):
    snapshot = Snapshot(config.parent)
    result = invoke("run", config, "--out", tmp_path / "run", "--no-progress")
    line = assert_one_line_error(result, *fragments)
    assert line.count(".h5") >= 2, line  # two files named
    assert not list((tmp_path / "run").rglob("model.json"))  # before any training
    snapshot.assert_nothing_lost()
    return line


def test_trident_features_of_two_encoders_never_train_together(tmp_path):
    """``uni_v1`` and ``resnet50`` files of the same width, the encoder recorded on the
    ``features`` dataset only, as TRIDENT writes it."""
    config = small_cohort(tmp_path / "cohort")
    encoders = ("uni_v1", "resnet50")
    even, odd = _rewrite_half(
        config, lambda p, f, c, i: write_trident_features(p, f, c, encoder=encoders[i % 2])
    )
    edit_config(config, lambda raw: raw["features"].update(encoder="uni"))
    with pytest.raises(FeatureFileError, match="encoder=uni .* encoder=resnet50-trunc"):
        common_identity([even[0], odd[0]])
    slides = [p.stem for p in even[:2] + odd[:2]]
    with pytest.raises(FeatureFileError, match="feature files made differently"):
        FeatureStore(config.parent / "features", slides)
    _assert_refused_before_training(tmp_path, config, "feature files made differently", "encoder")


def test_a_folder_mixing_256px_synthetic_and_512px_uni_is_refused(tmp_path):
    """Half the files are the generator's (256 px, ``synthetic`` on the file); the other half
    state ``uni`` at 512 px on the ``features`` dataset alone."""
    config = small_cohort(tmp_path / "cohort")

    def write(path, features, coords, i):
        with h5py.File(path, "w") as h5:
            h5.create_dataset("features", data=features)
            h5.create_dataset("coords", data=coords)
            if i % 2:
                h5["features"].attrs.update(encoder="uni", patch_size=512, mpp=0.5)
            else:
                h5.attrs.update(encoder="synthetic", patch_size=256, mpp=0.5)

    even, odd = _rewrite_half(config, write)
    with pytest.raises(FeatureFileError, match="made differently"):
        FeatureStore(config.parent / "features", [even[0].stem, odd[0].stem])
    _assert_refused_before_training(tmp_path, config, "feature files made differently")


def test_a_trident_file_without_tiles_says_to_drop_the_slide(tmp_path):
    config = small_cohort(tmp_path / "cohort")
    empty = feature_path(config.parent / "features", slide_of_split(config, "train"))
    empty.unlink()
    write_trident_features(  # what TRIDENT writes for a slide where no patch was kept
        empty, np.empty((0,), np.float32), np.empty((0, 2), np.int64), encoder="synthetic"
    )
    snapshot = Snapshot(config.parent)
    result = invoke("run", config, "--out", tmp_path / "run", "--no-progress")
    line = assert_one_line_error(result, str(empty), "no tiles in this slide", "drop it from")
    assert "re-extract" not in line
    snapshot.assert_nothing_lost()
