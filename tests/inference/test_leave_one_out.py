"""Leave-one-out effects in two passes equal masking each tile in turn through the method's own
forward, for every method, every aggregator and both routes."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch

from bidistill.models import list_methods
from bidistill.models.aggregators import AggregatorName
from bidistill.models.batch import Batch
from bidistill.models.leave_one_out import leave_one_out
from bidistill.models.streaming import ArrayBag, find_aggregators, predict_bag

from .test_chunked import DIM, build

CLINICAL = torch.tensor([1.0, 0.0, 0.3, 0.0, 0.0])


def masked_effects(method, bag: np.ndarray, clinical, valid, present: bool) -> np.ndarray:
    """The reference: the bag whole and without each tile, n + 1 rows of the method's forward;
    the log-odds of the positive class lost without each tile."""
    n = len(bag)
    keep = torch.ones(n + 1, n, dtype=torch.bool)
    keep[torch.arange(1, n + 1), torch.arange(n)] = False
    batch = Batch(
        torch.from_numpy(bag).expand(n + 1, -1, -1),
        keep,
        clinical.expand(n + 1, -1),
        valid.expand(n + 1, -1),
        torch.full((n + 1,), present),
    )
    with torch.no_grad():
        logits = method(batch).logits.double()
    margin = (logits[:, 1] - logits[:, 0]).numpy()
    return margin[0] - margin[1:]


def assert_same_effects(found: np.ndarray, expected: np.ndarray) -> None:
    """Equal to float32 rounding of the logits, at any scale of effect (random-init additive
    heads move the log-odds by 1e-4)."""
    scale = np.abs(expected).max(initial=0.0)
    np.testing.assert_allclose(found, expected, rtol=1e-3, atol=1e-6 + 1e-3 * scale)


def reference(method, name: str, bag, clinical, valid, present: bool) -> np.ndarray:
    """Masking on the route that predicts with aggregator ``name`` (as ``predict_bag`` routes):
    the patient's own, else the other; the patient's own if neither names it."""
    for route in (present, not present):
        if predict_bag(method, ArrayBag(bag), clinical, valid, route).routed == name:
            return masked_effects(method, bag, clinical, valid, route)
    return masked_effects(method, bag, clinical, valid, present)


@pytest.mark.parametrize("name", list_methods())
@pytest.mark.parametrize("present", [True, False])
def test_leave_one_out_equals_masking_each_tile(name, present):
    method = build(name)
    bag = np.random.default_rng(1).normal(size=(53, DIM)).astype(np.float32)
    clinical = CLINICAL if present else method.blank_clinical
    valid = torch.tensor([present, present])
    # a budget of 64 KiB: chunks of about a dozen instances
    out = leave_one_out(method, ArrayBag(bag), clinical, valid, present, memory_budget=2**16)
    predicted = predict_bag(method, ArrayBag(bag), clinical, valid, present)
    assert out.probability == pytest.approx(predicted.probability, abs=1e-6)
    assert out.routed == predicted.routed
    assert out.chunk_rows < len(bag) or not find_aggregators(method)
    assert set(out.attention) == set(find_aggregators(method))
    for aggregator, effects in out.attention.items():
        expected = reference(method, aggregator, bag, clinical, valid, present)
        assert effects.shape == (len(bag),)
        assert_same_effects(effects, expected)
        assert np.abs(effects).max() > 0, f"{aggregator}: no tile changes the prediction"


@pytest.mark.parametrize("aggregator", get_args(AggregatorName))
@pytest.mark.parametrize("instance_layers", [1, 2])
def test_every_aggregator_of_both_bd_branches_equals_masking(aggregator, instance_layers):
    method = build("bd", aggregator=aggregator, instance_layers=instance_layers)
    bag = np.random.default_rng(2).normal(size=(37, DIM)).astype(np.float32)
    valid = torch.tensor([True, True])
    budget = 2**20 if aggregator == "transmil" else 2**16  # TransMIL holds the whole bag
    out = leave_one_out(method, ArrayBag(bag), CLINICAL, valid, True, memory_budget=budget)
    assert out.routed == "aggregator_multi"
    multi = masked_effects(method, bag, CLINICAL, valid, True)
    single = masked_effects(method, bag, CLINICAL, valid, False)  # the WSI-only route
    assert not np.allclose(multi, single, rtol=0.1, atol=0)  # two branches, two answers
    assert_same_effects(out.attention["aggregator_multi"], multi)
    assert_same_effects(out.attention["aggregator_single"], single)


@pytest.mark.parametrize("aggregator", ["abmil", "abmil-count-mean"])
def test_a_tile_holding_nearly_all_the_softmax_weight_is_masked_not_subtracted(aggregator):
    method = build("wsi-only", aggregator=aggregator)
    [(path, module)] = find_aggregators(method).items()
    with torch.no_grad():  # scores span thousands: one tile takes all but ~1e-30 of the weight
        module.attention_w.weight.mul_(4000.0)
    bag = np.random.default_rng(3).normal(size=(29, DIM)).astype(np.float32)
    blank, valid = method.blank_clinical, torch.tensor([False, False])
    weights = predict_bag(method, ArrayBag(bag), blank, valid, False).attention[path]
    assert weights.max() > 1 - 1e-6  # the subtraction would leave nothing but rounding
    out = leave_one_out(method, ArrayBag(bag), blank, valid, False, memory_budget=2**16)
    expected = masked_effects(method, bag, blank, valid, False)
    assert_same_effects(out.attention[path], expected)
    assert np.argmax(np.abs(expected)) == np.argmax(weights)


@pytest.mark.parametrize("aggregator", ["abmil-count", "mean", "additive", "transmil"])
def test_a_bag_of_one_tile_loses_all_of_it(aggregator):
    """Without its only tile a bag is empty: a zero embedding, as every aggregator gives one."""
    method = build("wsi-only", aggregator=aggregator)
    bag = np.random.default_rng(4).normal(size=(1, DIM)).astype(np.float32)
    blank, valid = method.blank_clinical, torch.tensor([False, False])
    [path] = find_aggregators(method)
    out = leave_one_out(method, ArrayBag(bag), blank, valid, False)
    expected = masked_effects(method, bag, blank, valid, False)
    assert_same_effects(out.attention[path], expected)
