"""Latent-trait cohorts: files, determinism, and an exact Bayes posterior (checked three ways)."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit
from scipy.stats import norm
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from bidistill.cohort import load_cohort
from bidistill.config import load_config
from bidistill.synthetic import latent
from bidistill.synthetic.latent import (
    ClinicalFeature,
    LatentSpec,
    draw_latent_cohort,
    make_latent_cohort,
)
from bidistill.synthetic.suite import SUITE

# Every part of the model at once: key and marker instances, a diffuse clinical trace, a subtype
# with a diffuse trace and an interaction, a column that depends on the label, blank cells.
EVERYTHING = LatentSpec(
    "everything",
    patients=40,
    test_patients=60,
    dim=7,
    instances=(3, 8),
    prototypes=3,
    c_trace="marker",
    marker_shift=1.2,
    z_share=0.4,
    diffuse_z=0.8,
    beta_z=0.6,
    interaction=0.5,
    clinical=(
        ClinicalFeature("size", "numeric", "c", 0.6, mean=2, scale=1.5),
        ClinicalFeature("grade", "ordinal", "c", 0.7, cuts=(-0.5, 0.6)),
        ClinicalFeature("er", "binary", "c", 0.5, cuts=(0.2,)),
        ClinicalFeature("receptor", "binary", "z"),
        ClinicalFeature("lvi", "numeric", "label", 1.0),
        ClinicalFeature("site", "categorical", "none", levels=("a", "b")),
    ),
    blank_rate=0.2,
)


def digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(tmp_path):
    a = make_latent_cohort(EVERYTHING, tmp_path / "a", seed=1).parent
    b = make_latent_cohort(EVERYTHING, tmp_path / "b", seed=1).parent
    c = make_latent_cohort(EVERYTHING, tmp_path / "c", seed=2).parent
    assert digest(a) == digest(b)
    assert digest(a)["cohort.csv"] != digest(c)["cohort.csv"]


def test_the_cohort_loads_with_its_config_and_bayes_covers_the_test_patients(tmp_path):
    config = load_config(make_latent_cohort(EVERYTHING, tmp_path, seed=0))
    cohort = load_cohort(config.cohort)
    assert len(cohort.patients) == 100
    assert cohort.patients["split"].value_counts().to_dict() == {"test": 60, "train": 30, "val": 10}
    bayes = pd.read_csv(tmp_path / "bayes.csv", dtype={"patient_id": str})
    test = cohort.patients[cohort.patients["split"] == "test"]
    assert sorted(bayes["patient_id"]) == sorted(test.index)
    assert np.array_equal(bayes["label"], test.loc[bayes["patient_id"], "label"])
    # No clinical data: the posterior with it equals the one without.
    clinical = cohort.clinical_frame.loc[bayes["patient_id"]]
    none = clinical.isna().all(axis=1).to_numpy()
    np.testing.assert_allclose(bayes["bayes_present"][none], bayes["bayes_absent"][none])
    assert bayes[["bayes_present", "bayes_absent"]].apply(lambda c: c.between(0, 1)).all().all()


def _monte_carlo_posterior(drawn, i: int, *, with_clinical: bool, draws: int = 200_000):
    """P(y = 1 | bag[, row]) by importance sampling from the prior, with the likelihood written
    out directly in the full unrotated space (no shortcut shared with the module)."""
    spec, world = drawn.spec, drawn.world
    rng = np.random.default_rng(i)
    w = rng.normal(size=draws)
    v = w + rng.normal(scale=spec.slide_noise, size=draws)
    c = rng.normal(size=draws)
    z = (rng.random(draws) < spec.z_share).astype(float)
    x = world.from_features(drawn.bags[i])
    log_w = np.zeros(draws)
    f = expit(spec.key_slope * v + spec.key_offset)
    m = expit(spec.marker_slope * c + spec.marker_offset)
    shift = np.zeros((draws, spec.dim))
    shift[:, 2] = spec.diffuse_z * z
    for instance in x:
        centred = instance - shift

        def density(centre, centred=centred):
            return np.exp(-((centred - centre) ** 2).sum(axis=1) / 2)

        tissue = np.mean([density(mu) for mu in world.background], axis=0)
        marked = np.mean([density(mu + world.marker) for mu in world.background], axis=0)
        log_w += np.log(f * density(world.key) + (1 - f) * ((1 - m) * tissue + m * marked))
    ratio = 0.0
    if with_clinical:
        for feature in spec.clinical:
            value = drawn.table[i][feature.column]
            if value == "" or feature.source == "none":
                continue
            if feature.source == "z":
                log_w += np.where(z == int(value), 0.0, -np.inf)
            elif feature.source == "label":
                x_value = (float(value) - feature.mean) / feature.scale
                ratio += norm.logpdf(x_value, feature.strength) - norm.logpdf(x_value, 0)
            else:
                rho = feature.strength
                mean, sd = rho * c, np.sqrt(1 - rho**2)
                if feature.kind == "numeric":
                    x_value = (float(value) - feature.mean) / feature.scale
                    log_w += norm.logpdf(x_value, mean, sd)
                else:
                    level = int(value) - (feature.kind == "ordinal")
                    cuts = [-np.inf, *feature.cuts, np.inf]
                    p = norm.cdf((cuts[level + 1] - mean) / sd) - norm.cdf(
                        (cuts[level] - mean) / sd
                    )
                    log_w += np.log(p)
    weights = np.exp(log_w - log_w.max())
    b = spec.beta_w * (1 + spec.interaction * (2 * z - 1))
    score = b * w + spec.beta_c * c + spec.beta_z * z - latent._threshold(spec)
    p = (weights * norm.cdf(score / spec.label_noise)).sum() / weights.sum()
    return float(expit(np.log(p / (1 - p)) + ratio))


def test_the_posterior_matches_importance_sampling_from_the_prior():
    drawn = draw_latent_cohort(EVERYTHING, seed=4)
    patients = list(range(4))
    exact = drawn.posterior_frame(patients)
    for i in patients:
        for column, with_clinical in (("bayes_present", True), ("bayes_absent", False)):
            estimate = _monte_carlo_posterior(drawn, i, with_clinical=with_clinical)
            assert exact[column][i] == pytest.approx(estimate, abs=0.012), (i, column)


def test_the_posterior_is_calibrated_and_clinical_data_helps():
    spec = replace(EVERYTHING, patients=20, test_patients=1500, blank_rate=0.05)
    drawn = draw_latent_cohort(spec, seed=5)
    frame = drawn.posterior_frame(list(range(spec.patients, spec.patients + 1500)))
    assert frame["label"].mean() == pytest.approx(spec.prevalence, abs=0.03)
    for column in ("bayes_present", "bayes_absent"):
        p = frame[column].clip(1e-6, 1 - 1e-6)
        logit = np.log(p / (1 - p)).to_numpy()[:, None]
        fit = LogisticRegression(C=1e6).fit(logit, frame["label"])
        # A calibrated posterior: recalibrating it changes nothing (slope 1, intercept 0).
        assert fit.coef_[0, 0] == pytest.approx(1.0, abs=0.15), column
        assert fit.intercept_[0] == pytest.approx(0.0, abs=0.15), column
    auc = {c: roc_auc_score(frame["label"], frame[c]) for c in ("bayes_present", "bayes_absent")}
    assert auc["bayes_present"] > auc["bayes_absent"] + 0.03


def test_the_quadrature_grid_is_fine_enough(monkeypatch):
    # Large bags and a steep key share: the narrowest posterior over v the suite produces.
    spec = replace(SUITE["sparse-partial"], patients=20, test_patients=8, instances=(300, 400))
    spec = replace(spec, key_slope=2.5)
    drawn = draw_latent_cohort(spec, seed=6)
    patients = list(range(20, 28))
    coarse = drawn.posterior_frame(patients)
    monkeypatch.setattr(latent, "_V_GRID", np.linspace(-6, 6, 481))
    monkeypatch.setattr(latent, "_C_GRID", np.linspace(-5, 5, 201))
    fine = drawn.posterior_frame(patients)
    for column in ("bayes_present", "bayes_absent"):
        np.testing.assert_allclose(coarse[column], fine[column], atol=1e-5)


@pytest.mark.parametrize("name", list(SUITE))
def test_every_suite_generator_draws_with_a_sensible_limit(name):
    spec = replace(SUITE[name], patients=40, test_patients=300, instances=(5, 20))
    drawn = draw_latent_cohort(spec, seed=0)
    frame = drawn.posterior_frame(list(range(40, 340)))
    auc = {c: roc_auc_score(frame["label"], frame[c]) for c in ("bayes_present", "bayes_absent")}
    assert 0.6 < auc["bayes_absent"] <= auc["bayes_present"] + 0.01 < 0.99, auc
    lengths = [len(b) for b in drawn.bags]
    assert min(lengths) >= spec.instances[0] and max(lengths) <= spec.instances[1]
    assert drawn.bags[0].shape[1] == spec.dim


def test_a_spec_that_cannot_work_is_refused():
    with pytest.raises(ValueError, match="dim must be at least"):
        draw_latent_cohort(replace(EVERYTHING, dim=4))
    with pytest.raises(ValueError, match="prevalence"):
        draw_latent_cohort(replace(EVERYTHING, prevalence=1.0))
