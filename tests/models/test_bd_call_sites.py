"""BD where its pieces meet: the masks at the loss call site and the branch a prediction uses.

``distillation_kl`` and ``mse`` are tested alone in test_bd.py; these tests go through BD's
``forward`` and ``loss`` only, so they hold whatever the code inside looks like:

- the single-modal branch learns from the multi-modal branch's outputs of the patients WITH
  clinical data only (its KL teacher and e target are undefined without them);
- in eval a patient's prediction does not depend on who else is in the batch, and a patient with
  clinical data is predicted by the multi-modal branch (which reads the clinical values).
"""

from __future__ import annotations

import pytest
import torch

from bidistill.models import Batch

from .helpers import build, make_batch

N_VALUES = 6  # the clinical columns of helpers.make_batch before its missing indicators


def _bd(**options):
    """A tiny BD without dropout, so that two forward passes differ only by their inputs, and
    with random clinical columns, so that the untrained branches read the clinical values (a
    silent start reads them only after a step)."""
    return build("bd", dropout=0.0, **{"clinical_start": "random", **options})


def _with_clinical_values(batch: Batch, patients: torch.Tensor, shift: float) -> Batch:
    """The same batch with the encoded clinical values of ``patients`` [B] bool shifted."""
    clinical = batch.clinical.clone()
    clinical[patients, :N_VALUES] += shift
    return Batch(
        batch.bags,
        batch.tile_valid,
        clinical,
        batch.clinical_valid,
        batch.clinical_present,
        batch.labels,
    )


def _take(batch: Batch, rows: list[int]) -> Batch:
    """Patients ``rows`` of ``batch`` as a batch of their own, padded to their longest bag."""
    n = int(batch.tile_valid[rows].sum(dim=1).max())
    return Batch(
        batch.bags[rows, :n],
        batch.tile_valid[rows, :n],
        batch.clinical[rows],
        batch.clinical_valid[rows],
        batch.clinical_present[rows],
        None if batch.labels is None else batch.labels[rows],
    )


def _single_branch_parameters(bd) -> dict[str, torch.nn.Parameter]:
    """The parameters of BD's single-modal part (the branch used without clinical data)."""
    (part,) = [p for stage in bd.stages() for p in stage.parts if p.select == "absent"]
    return {
        name: p
        for name, p in bd.named_parameters()
        if any(name.startswith(module + ".") for module in part.modules)
    }


def _loss_and_single_grads(bd, batch: Batch):
    """BD's loss terms on ``batch`` and the gradient of the total on the single branch."""
    bd.train()
    bd.zero_grad(set_to_none=True)
    output = bd(batch)
    terms = bd.loss(batch, output)
    terms["total"].backward()
    grads = {
        name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for name, p in _single_branch_parameters(bd).items()
    }
    values = {name: value.detach() for name, value in terms.items()}
    return values, grads, output.extras["logits_multi"].detach()


def _assert_all_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=f"{name} changed")


def _changed(a: dict, b: dict) -> set[str]:
    return {name for name in a if not torch.allclose(a[name], b[name])}


def test_bd_learns_nothing_from_the_multimodal_outputs_of_patients_without_clinical_data():
    bd = _bd()
    batch = make_batch(b=6, seed=1)
    absent = ~batch.clinical_present
    assert absent.any() and batch.clinical_present.any()
    terms, grads, teacher = _loss_and_single_grads(bd, batch)
    # Big enough to move the multi-modal branch's logits of those patients a lot.
    shifted = _with_clinical_values(batch, absent, 5.0)
    terms_after, grads_after, teacher_after = _loss_and_single_grads(bd, shifted)
    moved = (teacher_after - teacher).abs().amax(dim=1)
    assert bool((moved[absent] > 1e-3).all()), "the perturbation did not reach the teacher"
    torch.testing.assert_close(teacher_after[~absent], teacher[~absent])
    _assert_all_equal(terms, terms_after)
    _assert_all_equal(grads, grads_after)


def test_bd_learns_from_the_multimodal_outputs_of_patients_with_clinical_data():
    bd = _bd()
    batch = make_batch(b=6, seed=1)
    one_present = torch.zeros(len(batch), dtype=torch.bool)
    one_present[int(batch.clinical_present.nonzero()[0])] = True
    terms, grads, _ = _loss_and_single_grads(bd, batch)
    terms_after, grads_after, _ = _loss_and_single_grads(
        bd, _with_clinical_values(batch, one_present, 5.0)
    )
    # The distillation terms the single branch learns from follow that patient's teacher.
    assert {"kl", "mse_e"} <= _changed(terms, terms_after)
    assert "mse_h" not in _changed(terms, terms_after)  # h_M does not read clinical data
    assert _changed(grads, grads_after), "the single branch's gradient ignores the teacher"


@torch.no_grad()
def test_a_patients_prediction_does_not_depend_on_the_rest_of_the_batch():
    bd = _bd().eval()
    everyone = torch.ones(6, dtype=torch.bool)
    all_present = make_batch(b=6, seed=2, present=everyone)
    mixed_present = everyone.clone()
    mixed_present[[1, 4]] = False
    # The same patients, two of them without clinical data (as the encoder writes them).
    mixed = make_batch(b=6, seed=2, present=mixed_present)
    nobody = make_batch(b=6, seed=2, present=~everyone)

    in_all_present = bd(all_present).probabilities
    in_mixed = bd(mixed).probabilities
    in_all_absent = bd(nobody).probabilities
    for row in range(6):
        alone_present = bd(_take(all_present, [row])).probabilities[0]
        alone_absent = bd(_take(nobody, [row])).probabilities[0]
        torch.testing.assert_close(in_all_present[row], alone_present)
        torch.testing.assert_close(in_all_absent[row], alone_absent)
        expected = alone_present if mixed_present[row] else alone_absent
        torch.testing.assert_close(in_mixed[row], expected)
    # Not vacuous: a patient's probability with clinical data differs from the one without.
    assert not torch.allclose(in_all_present, in_all_absent)


@torch.no_grad()
def test_patients_with_clinical_data_are_predicted_by_the_multimodal_branch():
    bd = _bd().eval()
    mixed = make_batch(b=6, seed=2)
    present = mixed.clinical_present
    assert present.any() and (~present).any()
    both = bd(mixed)  # a mixed batch runs both branches and returns each one's logits
    multi = torch.softmax(both.extras["logits_multi"], dim=-1)[:, 1]
    single = torch.softmax(both.extras["logits_single"], dim=-1)[:, 1]
    assert not torch.allclose(multi[present], single[present])
    rows = present.nonzero().flatten().tolist()
    only_present = _take(mixed, rows)  # a batch where every patient has clinical data
    torch.testing.assert_close(bd(only_present).probabilities, multi[rows])
    absent_rows = (~present).nonzero().flatten().tolist()
    torch.testing.assert_close(bd(_take(mixed, absent_rows)).probabilities, single[absent_rows])
    # And that branch reads the clinical values: shifting them moves the prediction.
    shifted = _with_clinical_values(only_present, torch.ones(len(rows), dtype=torch.bool), 2.0)
    moved = (bd(shifted).probabilities - bd(only_present).probabilities).abs()
    assert bool((moved > 1e-4).all())


@pytest.mark.parametrize("prompt", ["learned", "wsi"])
@torch.no_grad()
def test_a_patient_without_clinical_data_is_predicted_without_its_clinical_values(prompt):
    bd = _bd(prompt=prompt).eval()
    nobody = make_batch(b=4, seed=3, present=torch.zeros(4, dtype=torch.bool))
    shifted = _with_clinical_values(nobody, torch.ones(4, dtype=torch.bool), 5.0)
    torch.testing.assert_close(bd(shifted).probabilities, bd(nobody).probabilities)
