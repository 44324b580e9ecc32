"""Feature store, bag datasets, bucketing and padding, on real .h5 files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bidistill.errors import FeatureFileError
from bidistill.features.store import FeatureStore, feature_path, write_feature_file
from bidistill.training.data import (
    ArrayBags,
    LengthBucketSampler,
    PatientBags,
    StoreBags,
    collate_bags,
)


@pytest.fixture
def feature_dir(tmp_path):
    rng = np.random.default_rng(0)
    for slide, n in {"a": 5, "b": 9, "c": 3}.items():
        features = rng.normal(size=(n, 7)).astype(np.float16 if slide == "c" else np.float32)
        write_feature_file(
            feature_path(tmp_path, slide),
            features,
            np.zeros((n, 2)),
            encoder="test",
            patch_size=256,
            mpp=0.5,
        )
    return tmp_path


@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_store_reads_the_same_bags_in_memory_or_lazily(feature_dir, in_memory):
    store = FeatureStore(feature_dir, ["a", "b", "c"], in_memory=in_memory)
    assert store.in_memory == (in_memory == "yes") and store.dim == 7
    bags = StoreBags(store, [["a", "c"], ["b"], []])
    assert bags.lengths() == [8, 9, 0]
    assert bags(0).shape == (8, 7) and bags(2).shape == (0, 7)
    eager = FeatureStore(feature_dir, ["a", "b", "c"], in_memory="yes")
    np.testing.assert_array_equal(bags(1), eager.get("b"))


def test_missing_feature_file_is_named(feature_dir):
    with pytest.raises(FeatureFileError, match=r"no feature file for slides \['zz'\]"):
        FeatureStore(feature_dir, ["a", "zz"])


def test_different_feature_dimensions_are_refused(feature_dir):
    write_feature_file(
        feature_path(feature_dir, "d"),
        np.zeros((2, 5), np.float32),
        np.zeros((2, 2)),
        encoder="other",
        patch_size=256,
        mpp=0.5,
    )
    with pytest.raises(FeatureFileError, match="different dimensions"):
        FeatureStore(feature_dir, ["a", "d"])


def _dataset(max_instances=None, n=6, instance_dropout=0.0):
    rng = np.random.default_rng(1)
    bags = ArrayBags([rng.normal(size=(k, 4)).astype(np.float32) for k in (3, 10, 1, 7, 12, 2)])
    return PatientBags(
        bags,
        np.zeros((n, 3)),
        np.ones((n, 1), bool),
        np.ones(n, bool),
        np.arange(n) % 2,
        max_instances=max_instances,
        instance_dropout=instance_dropout,
        seed=5,
    )


def test_training_subset_is_bounded_random_and_reproducible():
    data = _dataset(max_instances=4)
    assert data.lengths() == [3, 4, 1, 4, 4, 2]
    first = data[4]["features"]
    assert first.shape == (4, 4)
    torch.testing.assert_close(data[4]["features"], first)  # same epoch, same subset
    data.set_epoch(1)
    assert not torch.equal(data[4]["features"], first)  # a new subset each epoch
    rows = {tuple(r.tolist()) for r in data.bags(4)}
    assert all(tuple(r.tolist()) in rows for r in first)  # real instances, not copies
    assert torch.equal(_dataset()[4]["features"], torch.from_numpy(data.bags(4)))


def test_instance_dropout_keeps_a_random_share_and_at_least_one():
    data = _dataset(instance_dropout=0.5, max_instances=5)
    assert data.lengths() == [2, 5, 1, 4, 5, 1]  # half, rounded, at least one, then the cap
    assert [len(data[i]["features"]) for i in range(6)] == data.lengths()
    first = data[3]["features"]
    data.set_epoch(1)
    assert not torch.equal(data[3]["features"], first)
    rows = {tuple(r.tolist()) for r in data.bags(3)}
    assert all(tuple(r.tolist()) in rows for r in first)


def test_collate_pads_to_the_largest_bag_with_masks():
    data = _dataset()
    batch = collate_bags([data[0], data[1], data[2]])
    assert batch.bags.shape == (3, 10, 4) and batch.bags.dtype == torch.float32
    assert batch.tile_valid.sum(dim=1).tolist() == [3, 10, 1]
    assert torch.all(batch.bags[~batch.tile_valid] == 0)
    assert batch.labels.tolist() == [0, 1, 0]


@pytest.mark.parametrize("shuffle", [True, False])
def test_bucket_sampler_yields_every_item_once(shuffle):
    lengths = [5, 1, 9, 3, 3, 8, 2, 7, 6, 4, 10]
    sampler = LengthBucketSampler(
        lengths, 3, shuffle=shuffle, generator=torch.Generator().manual_seed(0), pool_batches=2
    )
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    if not shuffle:
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(lengths)
    else:
        again = LengthBucketSampler(
            lengths, 3, shuffle=True, pool_batches=2, generator=torch.Generator().manual_seed(0)
        )
        assert list(again) == batches
