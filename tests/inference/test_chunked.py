"""Whole-bag prediction in bounded memory gives what the method's own forward gives."""

from __future__ import annotations

import tracemalloc
from typing import get_args

import h5py
import numpy as np
import pytest
import torch

from bidistill.models import create_method, list_methods
from bidistill.models.aggregators import AggregatorName
from bidistill.models.streaming import (
    ArrayBag,
    BagTooLargeError,
    PoolStream,
    chunk_rows,
    find_aggregators,
    predict_bag,
)
from bidistill.training.data import FileBag, collate_bags

DIM = 17  # odd, so that a swapped axis fails
FEATURE_SLICES = [(0, 2), (2, 3)]  # a categorical of 2 levels, then a numeric
CLINICAL_DIM = 3 + 2  # values, then one missing indicator per feature


def build(name: str, **options):
    torch.manual_seed(0)
    method = create_method(
        name,
        in_dim=DIM,
        clinical_dim=CLINICAL_DIM,
        n_clinical_features=2,
        feature_slices=FEATURE_SLICES,
        **options,
    )
    return method.eval()


def whole_bag(method, bag: np.ndarray, clinical: torch.Tensor, valid: torch.Tensor, present):
    """The reference: the method's own forward on the whole bag, padded as in training."""
    item = {
        "features": torch.from_numpy(bag),
        "clinical": clinical,
        "clinical_valid": valid,
        "clinical_present": torch.tensor(present),
        "label": None,
    }
    padding = {**item, "features": torch.zeros(len(bag) // 3, DIM)}  # a shorter bag beside it
    with torch.no_grad():
        output = method(collate_bags([item, padding]))
    attention = None if output.attention is None else output.attention[0, : len(bag)].numpy()
    return float(output.probabilities[0]), attention


@pytest.mark.parametrize("name", list_methods())
@pytest.mark.parametrize("present", [True, False])
def test_chunked_prediction_equals_the_whole_bag_forward(name, present):
    method = build(name)
    rng = np.random.default_rng(1)
    bag = rng.normal(size=(251, DIM)).astype(np.float32)
    clinical = torch.tensor([1.0, 0.0, 0.3, 0.0, 0.0]) if present else method.blank_clinical
    valid = torch.tensor([present, present])
    # a budget of 64 KiB: chunks of about a dozen instances
    out = predict_bag(method, ArrayBag(bag), clinical, valid, present, memory_budget=2**16)
    expected_p, expected_attention = whole_bag(method, bag, clinical, valid, present)
    assert out.chunk_rows < len(bag) or not find_aggregators(method)
    assert out.probability == pytest.approx(expected_p, abs=1e-5)
    if expected_attention is None:
        assert out.routed is None
    else:
        np.testing.assert_allclose(out.attention[out.routed], expected_attention, atol=1e-6)


@pytest.mark.parametrize("aggregator", get_args(AggregatorName))
def test_every_aggregator_predicts_in_chunks_as_its_forward(aggregator):
    """Each pooling's running sums (counts and bag sizes too) give the whole bag's answer."""
    method = build("wsi-only", aggregator=aggregator, instance_layers=2)
    bag = np.random.default_rng(5).normal(size=(1001, DIM)).astype(np.float32)
    valid = torch.zeros(2, dtype=torch.bool)
    budget = 2**28 if aggregator == "transmil" else 2**16  # TransMIL holds the whole bag
    out = predict_bag(
        method, ArrayBag(bag), method.blank_clinical, valid, False, memory_budget=budget
    )
    expected_p, expected_attention = whole_bag(method, bag, method.blank_clinical, valid, False)
    assert out.chunk_rows < len(bag) or aggregator == "transmil"
    assert out.probability == pytest.approx(expected_p, abs=1e-5)
    np.testing.assert_allclose(out.attention[out.routed], expected_attention, atol=1e-6)


def test_bd_routes_by_clinical_presence_and_keeps_both_branches():
    method = build("bd")
    bag = np.random.default_rng(2).normal(size=(40, DIM)).astype(np.float32)
    clinical = torch.tensor([0.0, 1.0, -0.5, 0.0, 0.0])
    valid = torch.tensor([True, True])
    with_clinical = predict_bag(method, ArrayBag(bag), clinical, valid, True)
    without = predict_bag(method, ArrayBag(bag), method.blank_clinical, ~valid, False)
    assert with_clinical.routed == "aggregator_multi" and without.routed == "aggregator_single"
    assert set(with_clinical.attention) == {"aggregator_multi", "aggregator_single"}
    for out in (with_clinical, without):
        for weights in out.attention.values():
            assert weights.shape == (40,) and weights.sum() == pytest.approx(1, abs=1e-5)


def test_float16_files_and_clam_layout_read_in_chunks(tmp_path):
    rng = np.random.default_rng(3)
    parts = [rng.normal(size=(n, DIM)).astype(np.float16) for n in (30, 7)]
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"s{i}.h5")
        with h5py.File(paths[-1], "w") as h5:
            h5["features"] = part[None] if i == 0 else part  # CLAM's older [1, n, D]
    bag = FileBag(paths)
    assert bag.lengths == [30, 7] and bag.dim == DIM
    chunks = [c.copy() for c in bag.chunks(8)]  # a block is valid until the next is read
    # Blocks run across the slides' files: the same blocks as the bag held in memory.
    in_memory = list(ArrayBag(np.concatenate(parts)).chunks(8))
    assert [len(c) for c in chunks] == [len(c) for c in in_memory] == [8, 8, 8, 8, 5]
    for read, held in zip(chunks, in_memory):
        np.testing.assert_array_equal(read, held)
    method = build("wsi-only")
    valid = torch.zeros(2, dtype=torch.bool)
    out = predict_bag(method, bag, method.blank_clinical, valid, False, memory_budget=2**16)
    joined = np.concatenate(parts).astype(np.float32)
    expected, _ = whole_bag(method, joined, method.blank_clinical, valid, False)
    assert out.probability == pytest.approx(expected, abs=1e-5)
    # ... so a patient's prediction is the same to the bit whether its tiles are read from one
    # file or several (training predicts from memory, `predict` from the files).
    held = predict_bag(method, ArrayBag(joined), method.blank_clinical, valid, False)
    assert out.probability == held.probability


def test_slides_of_float16_and_float32_read_as_one_float32_bag(tmp_path):
    rng = np.random.default_rng(4)
    parts = [rng.normal(size=(5, DIM)).astype(dtype) for dtype in (np.float16, np.float32)]
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    for path, part in zip(paths, parts):
        with h5py.File(path, "w") as h5:
            h5["features"] = part
    (block,) = FileBag(paths).chunks(100)
    assert block.dtype == np.float32
    np.testing.assert_array_equal(block, np.concatenate(parts).astype(np.float32))


@pytest.mark.slow
def test_a_bag_of_100000_tiles_stays_within_the_budget(tmp_path, monkeypatch):
    """Every chunk the model sees fits the budget, and so does what is read from the file."""
    budget = 4 * 2**20
    n = 100_000
    path = tmp_path / "big.h5"
    rng = np.random.default_rng(4)
    with h5py.File(path, "w") as h5:
        h5["features"] = rng.normal(size=(n, DIM)).astype(np.float32)  # 6.8 MB, over the budget
    method = build("bd")
    rows, fixed = chunk_rows(method, n, DIM, budget)
    assert rows < n and fixed < budget
    seen = []
    update = PoolStream.update

    def recorded(stream, chunk, chunk_valid):
        seen.append(chunk.shape[1])
        return update(stream, chunk, chunk_valid)

    monkeypatch.setattr(PoolStream, "update", recorded)
    valid = torch.zeros(2, dtype=torch.bool)
    tracemalloc.start()
    out = predict_bag(
        method, FileBag([path]), method.blank_clinical, valid, False, memory_budget=budget
    )
    _, peak = tracemalloc.get_traced_memory()  # numpy's allocations: the chunks read from h5
    tracemalloc.stop()
    assert max(seen) == rows and sum(seen) == 2 * n  # both branches, every tile once
    assert peak < budget
    with h5py.File(path) as h5:
        features = h5["features"][()]
    expected, attention = whole_bag(method, features, method.blank_clinical, valid, False)
    assert out.probability == pytest.approx(expected, abs=1e-5)
    np.testing.assert_allclose(out.attention["aggregator_single"], attention, atol=1e-7)


def test_transmil_runs_whole_bags_within_the_budget_and_refuses_larger_ones():
    method = build("wsi-only", aggregator="transmil", hidden_dim=16)
    bag = np.random.default_rng(5).normal(size=(60, DIM)).astype(np.float32)
    valid = torch.zeros(2, dtype=torch.bool)
    out = predict_bag(method, ArrayBag(bag), method.blank_clinical, valid, False)
    expected, _ = whole_bag(method, bag, method.blank_clinical, valid, False)
    assert out.probability == pytest.approx(expected, abs=1e-5)
    with pytest.raises(BagTooLargeError, match="100000 tiles.*TransMIL.*--memory-budget"):
        chunk_rows(method, 100_000, DIM, 64 * 2**20)


def test_a_budget_too_small_for_the_scores_is_refused():
    with pytest.raises(BagTooLargeError, match="raise --memory-budget"):
        chunk_rows(build("bd"), 10_000_000, DIM, 4 * 2**20)
