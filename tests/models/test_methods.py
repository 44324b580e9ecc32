"""Every registered method (parametrized over the registry, so a new one is tested too)."""

from dataclasses import replace

import pytest
import torch

from bidistill.errors import ConfigError
from bidistill.models import list_methods

from .helpers import build, make_batch, pad_more

EXPECTED = {
    "bd",
    "wsi-only",
    "clinical-only",
    "clinical-linear",
    "fusion-zero",
    "fusion-mean",
    "moddrop",
    "switch",
    "kd",
    "ae-impute",
    "ensemble",
    "shaspec",
}


def test_registry_lists_every_method():
    assert set(list_methods()) >= EXPECTED


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(ConfigError, match="unknown method 'bd2'.*Did you mean 'bd'.*wsi-only"):
        build("bd2")


def test_none_options_keep_the_defaults():
    assert build("bd", lambda_kd=None).options.lambda_kd == 2.0


@pytest.mark.parametrize("name", list_methods())
def test_every_stage_gives_named_finite_losses_and_gradients(name):
    method = build(name).train()
    batch = make_batch()
    for stage in method.stages():
        method.set_stage(stage.name)
        method.zero_grad(set_to_none=True)
        out = method(batch)
        assert out.logits.shape == (5, 2)
        terms = method.loss(batch, out)
        assert "total" in terms and len(terms) >= 2
        assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values()), terms
        torch.testing.assert_close(terms["total"], sum(v for k, v in terms.items() if k != "total"))
        terms["total"].backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())


@pytest.mark.parametrize("name", list_methods())
@pytest.mark.parametrize(
    "aggregator", ["abmil", "abmil-sum", "abmil-count", "abmil-count-mean", "additive", "transmil"]
)
def test_padding_and_missing_clinical_in_eval(name, aggregator):
    method = build(name, aggregator=aggregator).eval()
    batch = make_batch()
    with torch.no_grad():
        out = method(batch)
        padded = method(pad_more(batch, 5))
        again = method(batch)
    torch.testing.assert_close(padded.logits, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again.logits, out.logits)  # eval: no dropout, no random drops
    probabilities = out.probabilities
    assert probabilities.shape == (5,) and torch.all((probabilities >= 0) & (probabilities <= 1))
    assert torch.isfinite(out.logits).all()  # rows 1 and 4 have no clinical data
    if out.attention is not None:
        assert torch.all(out.attention[~batch.tile_valid] == 0)


@pytest.mark.parametrize("name", list_methods())
def test_unknown_option_is_an_error_naming_it(name):
    with pytest.raises(ConfigError, match=f"method '{name}': unknown option 'colour'"):
        build(name, colour="blue")


def test_fusion_zero_and_mean_differ_only_in_the_fill():
    zero, mean = build("fusion-zero"), build("fusion-mean")
    batch = make_batch()
    filled = zero.clinical_input(batch)
    assert torch.equal(mean.clinical_input(batch), batch.clinical)
    missing = ~batch.clinical_valid
    assert torch.all(filled[:, :6][:, [0, 1, 5]][missing[:, [0, 1, 3]]] == 0)
    assert torch.equal(filled[:, 6:], batch.clinical[:, 6:])  # indicators kept


def test_ensemble_averages_probabilities_where_clinical_is_present():
    method = build("ensemble").eval()
    batch = make_batch()
    with torch.no_grad():
        out = method(batch)
    p_wsi = torch.softmax(out.extras["logits_wsi"], -1)[:, 1]
    p_clin = torch.softmax(out.extras["logits_clinical"], -1)[:, 1]
    present = batch.clinical_present
    expected = torch.where(present, (p_wsi + p_clin) / 2, p_wsi)
    torch.testing.assert_close(out.probabilities, expected)


def test_kd_student_stage_freezes_the_teacher():
    method = build("kd")
    method.set_stage("student")
    method.train()
    assert not method.teacher.training and method.student.training
    assert not any(p.requires_grad for p in method.teacher.parameters())
    batch = make_batch()
    terms = method.loss(batch, method(batch))
    assert set(terms) == {"ce_student", "kl", "total"} and torch.isfinite(terms["kl"])


def test_kd_stages_release_only_what_they_froze():
    """Back in the teacher stage the teacher trains again, except a parameter that was frozen
    before any stage (an end-to-end backbone's ``freeze_until``), which stays frozen."""
    method = build("kd")
    frozen = method.teacher.aggregator.project[0].weight
    frozen.requires_grad_(False)
    for stage in ("teacher", "student", "teacher"):
        method.set_stage(stage)
    trainable = [p.requires_grad for p in method.teacher.parameters() if p is not frozen]
    assert all(trainable) and not frozen.requires_grad


FUSING = ["bd", "fusion-mean", "fusion-zero", "moddrop", "ae-impute", "shaspec", "switch", "kd"]


@pytest.mark.parametrize("name", FUSING)
@pytest.mark.parametrize("bag_layers", [0, 1])
def test_a_silent_clinical_start_reads_the_slides_alone_until_trained(name, bag_layers):
    """``clinical_start: silent``: the untrained method's logits do not move with the clinical
    values (its fusion heads' clinical columns are zero), and one optimiser step on the clinical
    data makes them move; with the random start they move from the first step."""
    batch = make_batch(b=8, present=torch.ones(8, dtype=torch.bool))
    other = make_batch(b=8, seed=1, present=torch.ones(8, dtype=torch.bool))
    moved = replace(batch, clinical=other.clinical, clinical_valid=other.clinical_valid)

    def logits(method):
        with torch.no_grad():
            return method.eval()(batch).logits, method(moved).logits

    silent = build(name, clinical_start="silent", dropout=0.0, bag_layers=bag_layers)
    torch.testing.assert_close(*logits(silent))
    random_start = build(name, clinical_start="random", dropout=0.0, bag_layers=bag_layers)
    assert not torch.allclose(*logits(random_start))
    optimiser = torch.optim.SGD(silent.parameters(), lr=0.1)
    silent.train()
    silent.set_stage(silent.stages()[0].name)  # kd: the fusion teacher
    silent.loss(batch, silent(batch))["total"].backward()
    optimiser.step()
    assert not torch.allclose(*logits(silent))


@pytest.mark.parametrize("start", ["slides", "reads"])
@pytest.mark.parametrize("name", list_methods())
def test_only_a_slides_start_puts_the_slides_stage_first(name, start):
    """``clinical_start: slides`` runs a stage ``slides`` before the method's own stages on
    every method with a fused slide read (the fusing ones), ``reads`` a stage ``clinical``
    after it, and neither changes anything on the others; without them the trainer runs the
    method's own stages."""
    plain, slides = build(name), build(name, clinical_start=start)
    assert plain.training_stages() == plain.stages()
    own = [s.name for s in slides.stages()]
    reads = ["slides", "clinical"] if start == "reads" else ["slides"]
    expected = [*reads, *own] if name in FUSING else own
    assert [s.name for s in slides.training_stages()] == expected
    # The stage after the slides stage, and only it, counts its start (the read) as epoch 0.
    candidates = [s.name for s in slides.training_stages() if s.start_is_candidate]
    assert candidates == (own[:1] if name in FUSING else [])


def _predicts_alike(method, batch, changed) -> None:
    """The method (in eval mode) gives ``batch`` and ``changed`` the same logits; left training."""
    with torch.no_grad():
        method.eval()
        torch.testing.assert_close(method(batch).logits, method(changed).logits)
    method.train()


def _parameter_names(method, modules) -> set[str]:
    return {f"{m}.{k}" for m in modules for k, _ in method.get_submodule(m).named_parameters()}


@pytest.mark.parametrize("name", FUSING)
def test_the_slides_stage_trains_the_fused_slide_read_alone(name):
    """In the slides stage the method predicts every patient with its fused slide read (the
    clinical data, given or not, changes nothing), its loss is the cross-entropy over every
    patient, and only the fused read's parameters train; the next stage makes the others
    trainable again, but not a parameter that was frozen before (an end-to-end backbone's)."""
    method = build(name, clinical_start="slides", dropout=0.0)
    frozen_before = next(iter(method.get_submodule(method.fused_read[0]).parameters()))
    frozen_before.requires_grad_(False)
    method.set_stage("slides")
    batch = make_batch(b=8)
    other = make_batch(b=8, seed=1)
    blanked = replace(batch, clinical=other.clinical, clinical_present=~batch.clinical_present)
    _predicts_alike(method, batch, blanked)
    out = method(batch)
    terms = method.training_loss(batch, out)
    torch.testing.assert_close(terms["total"], method.ce(out.logits, batch.labels))
    terms["total"].backward()
    read = _parameter_names(method, method.fused_read)
    trained = {n for n, p in method.named_parameters() if p.grad is not None}
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trained and trained <= read and trainable <= read
    method.set_stage(method.stages()[0].name)
    outside = {n for n, p in method.named_parameters() if n not in read}
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert outside <= trainable
    assert not frozen_before.requires_grad


@pytest.mark.parametrize("name", FUSING)
def test_the_clinical_stage_trains_the_fused_clinical_embedding_alone(name):
    """``clinical_start: reads``: in the clinical stage the method predicts from the clinical
    data alone (other slides change nothing), through the clinical embedding its fusion head
    reads and a linear read of its own; its loss is the cross-entropy over the patients with
    clinical data, and only that embedding and its read train. The own stages leave the read
    alone and train the embedding inside the fused model."""
    method = build(name, clinical_start="reads", dropout=0.0)
    method.set_stage("clinical")
    batch = make_batch(b=8)
    _predicts_alike(method, batch, replace(batch, bags=make_batch(b=8, seed=1).bags))
    out = method(batch)
    terms = method.training_loss(batch, out)
    expected = method.ce(out.logits, batch.labels, batch.clinical_present)
    torch.testing.assert_close(terms["total"], expected)
    terms["total"].backward()
    clinical = _parameter_names(method, (*method.fused_clinical, "clinical_read"))
    trained = {n for n, p in method.named_parameters() if p.grad is not None}
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trained == clinical and trainable == clinical

    method.zero_grad()
    method.set_stage(method.stages()[0].name)
    assert not any(p.requires_grad for p in method.clinical_read.parameters())
    with torch.no_grad():  # a head that reads the clinical embedding (the silent one does not)
        for name_, p in method.named_parameters():
            if "head" in name_ and p.dim() == 2:
                p.normal_(0, 0.5)
    method.loss(batch, method(batch))["total"].backward()
    embedding = [method.get_submodule(m) for m in method.fused_clinical]
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for m in embedding for p in m.parameters()
    )


@pytest.mark.parametrize("name", FUSING)
def test_a_reads_start_draws_the_same_weights_as_a_slides_start(name):
    """The clinical stage's read is built after the method, so the two starts' slides stages
    begin from the same weights (and train the same): they differ only by the clinical stage."""
    slides = build(name, clinical_start="slides").state_dict()
    reads = build(name, clinical_start="reads").state_dict()
    assert set(reads) - set(slides) == {"clinical_read.weight", "clinical_read.bias"}
    for key, value in slides.items():
        torch.testing.assert_close(reads[key], value)


@pytest.mark.parametrize("start", ["slides", "reads"])
@pytest.mark.parametrize("name", FUSING)
def test_the_own_stages_start_from_the_slide_read(name, start):
    """With ``clinical_start: slides`` (or ``reads``) the fusion heads start silent: until the
    method's own stages train, a patient with clinical data gets exactly what the slides stage
    selected (the fused read with the clinical embedding at zero)."""
    method = build(name, clinical_start=start, dropout=0.0).eval()
    batch = make_batch(b=8, present=torch.ones(8, dtype=torch.bool))
    with torch.no_grad():
        method.set_stage("slides")
        read = method(batch).logits
        method.set_stage(method.stages()[-1].name)
        fused = method(batch).logits
    torch.testing.assert_close(fused, read)


POOLING = [name for name in list_methods() if not name.startswith("clinical-")]


@pytest.mark.parametrize("name", POOLING)
def test_bag_layers_put_a_trained_layer_between_the_pooling_and_every_head(name):
    """``bag_layers: 1``: every head of the method reads its bag embedding through one Linear
    → ReLU layer (hidden_dim wide), which training reaches; padding still changes nothing, and
    ``bag_layers: 0`` holds no such parameters, so checkpoints saved before the option load."""
    plain, deep = build(name), build(name, bag_layers=1, hidden_dim=16)
    assert not any("read_bag" in key for key in plain.state_dict())
    readers = {k: m for k, m in deep.named_modules() if k.endswith("read_bag")}
    assert readers and all(len(m) == 2 and m[0].out_features == 16 for m in readers.values())
    deep.train()
    deep.set_stage(deep.stages()[-1].name)  # the stage that trains every head (kd: student)
    batch = make_batch()
    deep.loss(batch, deep(batch))["total"].backward()
    trained = [k for k, m in readers.items() if m[0].weight.grad is not None]
    assert trained and all(readers[k][0].weight.grad.abs().sum() > 0 for k in trained)
    deep.eval()
    with torch.no_grad():
        torch.testing.assert_close(deep(pad_more(batch, 4)).logits, deep(batch).logits)


@pytest.mark.parametrize("name", POOLING)
def test_instance_layers_embed_every_instance_through_trained_layers_before_the_pooling(name):
    """``instance_layers: 2``: every aggregator of the method embeds each instance with two
    Linear → ReLU → Dropout layers (D → H, then H → H), both reached by training; padding
    still changes nothing, and the default (one layer) keeps the parameter names of
    checkpoints saved before the option, so they load."""
    plain, deep = build(name), build(name, instance_layers=2, hidden_dim=16)
    assert not any(key.endswith("project.3.weight") for key in plain.state_dict())
    projections = {k: m for k, m in deep.named_modules() if k.endswith("project")}
    assert projections
    for module in projections.values():
        linear = [m for m in module if isinstance(m, torch.nn.Linear)]
        assert [m.out_features for m in linear] == [16, 16] and linear[1].in_features == 16
    deep.train()
    deep.set_stage(deep.stages()[-1].name)
    batch = make_batch()
    deep.loss(batch, deep(batch))["total"].backward()
    second = [m[3].weight.grad for m in projections.values() if m[3].weight.grad is not None]
    assert second and all(grad.abs().sum() > 0 for grad in second)
    deep.eval()
    with torch.no_grad():
        torch.testing.assert_close(deep(pad_more(batch, 4)).logits, deep(batch).logits)
