"""Every registered method with K = 4 classes: K logits, K-class losses, whole-bag prediction."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from bidistill.models import list_methods
from bidistill.models.base import distillation_kl
from bidistill.models.streaming import ArrayBag, predict_bag

from ..models.helpers import build, make_batch

K = 4


def _batch():
    batch = make_batch(b=8)
    return replace(batch, labels=torch.tensor([0, 1, 2, 3, 3, 2, 1, 0]))


@pytest.mark.parametrize("name", list_methods())
def test_every_method_predicts_k_classes_and_trains_on_them(name):
    method = build(name, n_classes=K).train()
    batch = _batch()
    for stage in method.stages():
        method.set_stage(stage.name)
        method.zero_grad(set_to_none=True)
        out = method(batch)
        assert out.logits.shape == (8, K)
        terms = method.loss(batch, out)
        assert all(torch.isfinite(v) for v in terms.values()), terms
        terms["total"].backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    method.eval()
    probabilities = method(batch).probabilities
    assert probabilities.shape == (8, K)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(8))


@pytest.mark.parametrize("name", ["bd", "wsi-only", "shaspec", "clinical-linear"])
def test_whole_bag_prediction_gives_each_class_probability(name):
    method = build(name, n_classes=K).eval()
    batch = make_batch(b=1, n=23)
    expected = method(batch).probabilities[0].detach().numpy()
    bag = ArrayBag(batch.bags[0].numpy())
    one = predict_bag(method, bag, batch.clinical[0], batch.clinical_valid[0], True)
    assert one.probability.shape == (K,)
    np.testing.assert_allclose(one.probability, expected, atol=1e-5)


def test_class_weights_balance_k_classes_and_distillation_is_k_class():
    from bidistill.training.train import class_weights

    weights = class_weights(np.array([0, 0, 0, 0, 1, 1, 2, 2]), 4)
    # n / (K n_c); an empty class counts as one patient
    torch.testing.assert_close(weights, torch.tensor([0.5, 1.0, 1.0, 2.0]))
    teacher = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    assert distillation_kl(teacher, teacher.clone(), 1.2) == 0
    assert distillation_kl(teacher, torch.zeros(1, 4), 1.2) > 0
