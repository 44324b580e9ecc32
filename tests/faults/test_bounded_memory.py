"""Prediction of any bag size in bounded memory, and a memory check before allocating."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bidistill.models import create_method
from bidistill.models.aggregators import GatedAttentionMIL, MeanPoolMIL
from bidistill.models.streaming import PoolStream

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


@pytest.mark.parametrize(
    "aggregator", ["abmil", "abmil-sum", "abmil-count", "abmil-count-mean", "additive", "mean"]
)
def test_streamed_pooling_equals_the_one_pass_result(aggregator):
    method = _method(aggregator=aggregator)
    module = next(m for m in method.modules() if isinstance(m, GatedAttentionMIL | MeanPoolMIL))
    bags = torch.randn(3, 1000, 8) * 3
    valid = torch.ones(3, 1000, dtype=torch.bool)
    valid[1, 600:] = False  # padding
    valid[2] = False  # an empty bag
    with torch.no_grad():
        expected = module(bags, valid)
    stream = PoolStream(module, 1000)
    for start in range(0, 1000, 97):
        stream.update(bags[:, start : start + 97], valid[:, start : start + 97])
    streamed = stream.result()
    torch.testing.assert_close(streamed.embedding, expected.embedding, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(streamed.attention, expected.attention, rtol=1e-5, atol=1e-7)
    assert torch.all(streamed.embedding[2] == 0)


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


def test_the_run_checks_prediction_memory_before_training(tmp_path, monkeypatch):
    import bidistill.training.feature_source as feature_source

    # The predictions table's budget, too small for the attention scores of any bag.
    monkeypatch.setattr(feature_source, "training_budget", lambda: 64)
    config = small_cohort(tmp_path / "cohort", methods=["wsi-only"])
    result = invoke("run", config, "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(result, "patient '", "cannot hold the attention scores", "free memory")
    assert "--memory-budget" not in result.output  # an option of predict, not of run
    assert not (tmp_path / "run" / "wsi-only" / "model.safetensors").exists()


def test_training_predicts_within_most_of_the_free_memory(monkeypatch):
    import bidistill.training.feature_source as feature_source
    from bidistill.models.streaming import DEFAULT_MEMORY_BUDGET

    monkeypatch.setattr(feature_source, "available_memory_bytes", lambda: 100 * 2**30)
    assert feature_source.training_budget() == int(0.6 * 100 * 2**30)
    monkeypatch.setattr(feature_source, "available_memory_bytes", lambda: 2**20)
    assert feature_source.training_budget() == DEFAULT_MEMORY_BUDGET


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
