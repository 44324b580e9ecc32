"""The BD losses: stop-gradients, KL direction and T² scaling, routing, stages, options."""

import pytest
import torch
import torch.nn.functional as F

from bidistill.errors import ConfigError
from bidistill.models import distillation_kl

from .helpers import build, make_batch


def _grads(method, term: str) -> dict[str, bool]:
    """Which parameter groups receive a non-zero gradient from one loss term."""
    method.zero_grad(set_to_none=True)
    batch = make_batch()
    terms = method.loss(batch, method(batch))
    terms[term].backward()
    groups = {}
    for name, p in method.named_parameters():
        group = name.split(".")[0]
        got = p.grad is not None and bool(p.grad.abs().sum() > 0)
        groups[group] = groups.get(group, False) or got
    return groups


def test_stop_gradients_really_stop_gradients():
    torch.manual_seed(0)
    # Random clinical columns: a silent start gives the clinical MLP and the prompt no gradient
    # until the heads' first step, which would hide a missing stop-gradient here.
    bd = build("bd", dropout=0.0, clinical_start="random").train()
    multi = {"aggregator_multi", "clinical", "head_multi"}
    single = {"aggregator_single", "prompt", "head_single"}

    g = _grads(bd, "mse_h")  # MSE(h_M, sg(h_S)): only M's aggregator moves
    assert g["aggregator_multi"] and not any(g[k] for k in single | {"clinical", "head_multi"})

    g = _grads(bd, "mse_e")  # MSE(e_S, sg(e_M)): only the prompt moves
    assert g["prompt"] and not any(g[k] for k in multi | {"aggregator_single", "head_single"})

    g = _grads(bd, "kl")  # KL(sg(p_M) ‖ p_S): only S moves
    assert g["aggregator_single"] and g["head_single"] and g["prompt"]
    assert not any(g[k] for k in multi)

    g = _grads(bd, "ce_multi")
    assert all(g[k] for k in multi) and not any(g[k] for k in single)


def test_kl_direction_and_temperature_scaling():
    torch.manual_seed(0)
    teacher, student = torch.randn(6, 2) * 2, torch.randn(6, 2)
    for t in (1.0, 1.2, 4.0):
        p_t = torch.softmax(teacher / t, dim=-1)
        p_s = torch.softmax(student / t, dim=-1)
        forward_kl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
        ours = distillation_kl(teacher, student, t)
        torch.testing.assert_close(ours, t**2 * forward_kl)
        # the same as PyTorch's kl_div(log q, p) = KL(p ‖ q)
        ref = F.kl_div(torch.log_softmax(student / t, -1), p_t, reduction="batchmean") * t**2
        torch.testing.assert_close(ours, ref)
        reverse = (p_s * (p_s.log() - p_t.log())).sum(-1).mean() * t**2
        assert not torch.isclose(ours, reverse)


def test_kl_is_averaged_over_the_mask_only():
    teacher, student = torch.randn(4, 2), torch.randn(4, 2)
    mask = torch.tensor([True, False, True, False])
    torch.testing.assert_close(
        distillation_kl(teacher, student, 1.2, mask),
        distillation_kl(teacher[mask], student[mask], 1.2),
    )


def test_prediction_routes_by_clinical_present():
    bd = build("bd").eval()
    batch = make_batch(b=6)
    with torch.no_grad():
        out = bd(batch)
    x, present = out.extras, batch.clinical_present
    assert present.any() and (~present).any()
    torch.testing.assert_close(out.logits[present], x["logits_multi"][present])
    torch.testing.assert_close(out.logits[~present], x["logits_single"][~present])
    assert not torch.allclose(x["logits_multi"], x["logits_single"])


def test_loss_terms_are_weighted_by_the_options():
    torch.manual_seed(0)
    batch = make_batch()
    plain = build("bd", lambda_kd=1.0, lambda_h=0.2, lambda_e=0.5)
    heavy = build("bd", lambda_kd=2.0, lambda_h=0.4, lambda_e=1.0)
    heavy.load_state_dict(plain.state_dict())
    plain.eval(), heavy.eval()
    a, b = plain.loss(batch, plain(batch)), heavy.loss(batch, heavy(batch))
    for term in ("kl", "mse_h", "mse_e"):
        torch.testing.assert_close(b[term], 2 * a[term])
    torch.testing.assert_close(a["total"], sum(v for k, v in a.items() if k != "total"))


def test_warmup_stage_trains_the_multimodal_branch_alone():
    bd = build("bd", warmup_epochs=3)
    assert [(s.name, s.select, s.epochs) for s in bd.stages()] == [
        ("warmup", "present", 3),
        ("joint", "routed", None),
    ]
    bd.set_stage("warmup")
    g = _grads(bd, "total")
    assert g["aggregator_multi"] and not g["aggregator_single"] and not g["prompt"]
    batch = make_batch()
    assert set(bd.loss(batch, bd(batch))) == {"ce_multi", "total"}


def test_wsi_prompt_depends_on_the_bag():
    bd = build("bd", prompt="wsi").eval()
    with torch.no_grad():
        e = bd(make_batch()).extras["e_single"]
    assert not torch.allclose(e[0], e[1])
    learned = build("bd").eval()
    with torch.no_grad():
        e = learned(make_batch()).extras["e_single"]
    torch.testing.assert_close(e[0], e[1])


def test_feature_dropout_marks_features_missing_with_the_blank_values():
    bd = build("bd", feature_dropout=0.99).train()
    blank = torch.arange(bd.dims.clinical_dim, dtype=torch.float32)
    bd.set_blank_clinical(blank)
    batch = make_batch(present=torch.ones(5, dtype=torch.bool))
    torch.manual_seed(0)
    dropped = bd.drop_features(batch.clinical, batch.clinical_valid, 0.99)
    n_values = bd.dims.n_values
    for f, (start, stop) in enumerate(bd.dims.feature_slices):
        was = batch.clinical_valid[:, f]
        assert torch.all(dropped[was, n_values + f] == blank[n_values + f])
        torch.testing.assert_close(
            dropped[was, start:stop], blank[start:stop].expand(int(was.sum()), -1)
        )
    bd.eval()
    assert torch.equal(bd.drop_features(batch.clinical, batch.clinical_valid, 0.99), batch.clinical)


def test_unknown_bd_option_is_named():
    with pytest.raises(ConfigError, match="unknown option 'lamda_kd'.*did you mean 'lambda_kd'"):
        build("bd", lamda_kd=0.5)
    with pytest.raises(ConfigError, match="option 'prompt'"):
        build("bd", prompt="text")


def test_each_branch_is_selected_on_its_own_route_unless_asked_otherwise():
    (joint,) = build("bd").stages()
    parts = {p.name: (p.select, set(p.modules)) for p in joint.parts}
    assert parts == {
        "multi": ("present", {"aggregator_multi", "clinical", "head_multi"}),
        "single": ("absent", {"aggregator_single", "prompt", "head_single"}),
    }
    bd = build("bd")
    owned = {name.split(".")[0] for name, _ in bd.named_parameters()}
    assert owned == set().union(*(modules for _, modules in parts.values()))
    (one,) = build("bd", branch_selection=False).stages()
    assert one.parts == () and one.select == "routed"


def test_the_published_form_is_a_valid_option_set():
    from bidistill.models.bd import PAPER_OPTIONS

    paper = build("bd", **PAPER_OPTIONS)
    o = paper.options
    assert (o.lambda_h, o.lambda_e, o.lambda_kd, o.temperature) == (0.2, 0.5, 0.5, 1.2)
    assert o.prompt == "learned" and not o.branch_selection
    assert paper.stages()[0].parts == ()


def test_the_slide_head_trains_m_s_slide_read_on_every_patient_and_only_that():
    """λ_slide · CE(slide_head(h_M), y) moves M's aggregator and the slide head alone, counts
    the patients without clinical data too, belongs to M's part (its best epoch), and changes
    no prediction; without it the model has no such head (old runs' weights still fit)."""
    torch.manual_seed(0)
    assert not hasattr(build("bd"), "slide_head")
    bd = build("bd", dropout=0.0, lambda_slide=0.5).train()
    g = _grads(bd, "ce_slide")
    assert g["aggregator_multi"] and g["slide_head"]
    assert not any(g[k] for k in ("clinical", "head_multi", "aggregator_single", "prompt"))
    batch = make_batch()
    assert not batch.clinical_present.all()  # the helper's batch mixes both kinds of patient
    terms = bd.loss(batch, bd(batch))
    h = bd(batch).extras["h_multi"]
    every = F.cross_entropy(bd.slide_head(h), batch.labels)  # unweighted classes: all 1
    torch.testing.assert_close(terms["ce_slide"], 0.5 * every)
    (joint,) = bd.stages()
    assert "slide_head" in next(p for p in joint.parts if p.name == "multi").modules
    bd.eval()
    plain = build("bd", dropout=0.0)
    plain.load_state_dict({k: v for k, v in bd.state_dict().items() if "slide_head" not in k})
    plain.eval()
    torch.testing.assert_close(bd(batch).logits, plain(batch).logits)


def test_a_bd_run_from_before_lambda_slide_keeps_its_fingerprint():
    """BD runs recorded before ``lambda_slide`` existed trained the model that 0 builds, so at 0
    the option is left out of the fingerprint (no retraining on upgrade); any other value is
    another model and is in it."""
    from bidistill.models.registry import fingerprinted_options, resolved_options

    assert resolved_options("bd", {})["lambda_slide"] == 0.0
    assert "lambda_slide" not in fingerprinted_options("bd", {})
    assert fingerprinted_options("bd", {"lambda_slide": 0.5})["lambda_slide"] == 0.5
