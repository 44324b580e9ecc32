"""Prediction of any bag size in bounded memory, and a memory check before allocating."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bidistill.models import create_method
from bidistill.models.aggregators import GatedAttentionMIL, MeanPoolMIL, TransMIL
from bidistill.models.streaming import (
    BagTooLargeError,
    BoundedBatchSampler,
    PoolStream,
    check_prediction_memory,
    streaming_aggregation,
)
from bidistill.training.data import LengthBucketSampler

from .conftest import assert_one_line_error, invoke, small_cohort


def _method(name="wsi-only", aggregator="abmil"):
    torch.manual_seed(0)
    method = create_method(
        name,
        in_dim=8,
        clinical_dim=2,
        n_clinical_features=1,
        feature_slices=((0, 1),),
        aggregator=aggregator,
    )
    return method.eval()


@pytest.mark.parametrize("aggregator", ["abmil", "mean"])
def test_streamed_pooling_equals_the_one_pass_result(aggregator):
    method = _method(aggregator=aggregator)
    module = next(m for m in method.modules() if isinstance(m, GatedAttentionMIL | MeanPoolMIL))
    bags = torch.randn(3, 1000, 8) * 3
    valid = torch.ones(3, 1000, dtype=torch.bool)
    valid[1, 600:] = False  # padding
    valid[2] = False  # an empty bag
    with torch.no_grad():
        expected = module(bags, valid)
        with streaming_aggregation(method, chunk=97):
            streamed = module(bags, valid)
    torch.testing.assert_close(streamed.embedding, expected.embedding, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(streamed.attention, expected.attention, rtol=1e-5, atol=1e-7)
    assert torch.all(streamed.embedding[2] == 0)
    assert "forward" not in vars(module)  # restored after the block


@pytest.fixture
def chunk_widths(monkeypatch) -> list[int]:
    """The width of every chunk a ``PoolStream`` pools, in order."""
    widths: list[int] = []
    update = PoolStream.update

    def recorded(stream, chunk, valid):
        widths.append(chunk.shape[1])
        return update(stream, chunk, valid)

    monkeypatch.setattr(PoolStream, "update", recorded)
    return widths


def test_a_large_bag_is_projected_a_chunk_at_a_time(chunk_widths):
    method = _method()
    widths = chunk_widths
    bag = torch.randn(1, 20_000, 8)
    with torch.no_grad(), streaming_aggregation(method, chunk=4096):
        from bidistill.models.batch import Batch

        batch = Batch(
            bags=bag,
            tile_valid=torch.ones(1, 20_000, dtype=torch.bool),
            clinical=torch.zeros(1, 2),
            clinical_valid=torch.zeros(1, 1, dtype=torch.bool),
            clinical_present=torch.zeros(1, dtype=torch.bool),
        )
        probability = method(batch).probabilities
    assert max(widths) == 4096 and sum(widths) == 20_000
    assert torch.isfinite(probability).all()


def test_batches_are_capped_in_bytes_and_otherwise_match_the_training_sampler():
    lengths = [5, 90, 7, 2_000_000, 30, 12, 8, 44]
    ordinary = list(LengthBucketSampler(lengths, 3, shuffle=False))
    capped = list(BoundedBatchSampler(lengths, 3, dim=8, max_bytes=10**9))
    assert capped == ordinary  # nothing binds: the same batches, so the same numbers
    tight = list(BoundedBatchSampler(lengths, 3, dim=8, max_bytes=8 * 4 * 200))
    assert [3] in tight  # the huge bag alone
    assert sorted(i for b in tight for i in b) == list(range(len(lengths)))


def test_a_bag_too_large_for_memory_is_refused_before_allocating():
    with pytest.raises(BagTooLargeError, match=r"patient 'P7': .*2,000,000,000 instances"):
        check_prediction_memory(
            _method(), [10, 2 * 10**9], 8, names=["P1", "P7"], available=16 * 2**30
        )
    # A bag that fits streamed passes; TransMIL's exact attention over 2e5 instances does not.
    check_prediction_memory(_method(), [2 * 10**7], 8, None, available=16 * 2**30)
    transmil = _method(aggregator="transmil")
    assert any(isinstance(m, TransMIL) for m in transmil.modules())
    with pytest.raises(BagTooLargeError, match="TransMIL"):
        check_prediction_memory(transmil, [200_000], 8, None, available=16 * 2**30)


def test_the_run_checks_prediction_memory_before_training(tmp_path, monkeypatch):
    import bidistill.features.hygiene as hygiene

    monkeypatch.setattr(hygiene, "available_memory_bytes", lambda: 10_000)
    config = small_cohort(tmp_path / "cohort", methods=["wsi-only"])
    result = invoke("run", config, "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(result, "predicting its bag of", "memory available")
    assert not (tmp_path / "run" / "wsi-only" / "model.safetensors").exists()


def test_predict_bags_handles_a_bag_far_larger_than_a_chunk(chunk_widths):
    from bidistill.cohort.encoder import EncodedClinical
    from bidistill.inference import predict_bags

    method = _method()
    bags = [np.random.default_rng(0).normal(size=(n, 8)).astype("float32") for n in (5, 12_345)]
    clinical = EncodedClinical(
        values=np.zeros((2, 2), "float32"),
        valid=np.zeros((2, 1), bool),
        present=np.zeros(2, bool),
    )
    rows = chunk_widths
    streamed = predict_bags(method, bags, clinical, memory_budget=2**20)
    assert 1 < max(rows) < 12_345  # encoded in chunks
    rows.clear()
    one_pass = predict_bags(method, bags, clinical, memory_budget=2**30)
    assert max(rows) == 12_345  # one pass
    np.testing.assert_allclose(streamed.probabilities, one_pass.probabilities, rtol=1e-5)
