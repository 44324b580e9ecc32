"""The synthetic feature cohort: contract-conform files, planted signal, determinism."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from bidistill.cohort import ClinicalEncoder, load_cohort
from bidistill.config import load_config
from bidistill.features.store import read_feature_file
from bidistill.synthetic.features import make_feature_cohort


def digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    kwargs = {"patients": 30, "dim": 8, "instances": (5, 10)}
    a = make_feature_cohort(tmp_path / "a", seed=7, **kwargs).parent
    b = make_feature_cohort(tmp_path / "b", seed=7, **kwargs).parent
    c = make_feature_cohort(tmp_path / "c", seed=8, **kwargs).parent
    assert digest(a) == digest(b)
    assert digest(a)["cohort.csv"] != digest(c)["cohort.csv"]


def test_files_follow_the_contracts(synth_cohort):
    cfg = load_config(synth_cohort)
    cohort = load_cohort(cfg.cohort)
    assert len(cohort.patients) == 80
    per_patient = cohort.slides.groupby("patient_id").size()
    assert per_patient.max() == 2 and per_patient.min() == 1
    table = pd.read_csv(cfg.cohort.table, dtype=str)
    # rows are shuffled: a two-slide patient's rows are not always adjacent
    assert not table["patient_id"].is_monotonic_increasing
    for slide_id in cohort.slides["slide_id"]:
        f = read_feature_file(cfg.features.dir / f"{slide_id}.h5")
        assert f.features.dtype == np.float32 and f.features.shape[1] == 16
        assert f.coords.dtype == np.int64 and f.coords.shape == (len(f.features), 2)
        assert {"encoder", "patch_size", "mpp", "level", "bidistill_version"} <= set(f.attrs)
    # realistic mess: blanks and patients without any clinical data
    missing = cohort.clinical_frame.isna()
    assert 0 < missing.to_numpy().mean() < 0.3
    assert missing.all(axis=1).any()


def test_both_modalities_carry_the_label(tmp_path):
    """Key-instance share (slides) and the clinical vector each predict the label."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    config = make_feature_cohort(tmp_path, patients=300, seed=1, dim=16, instances=(40, 60))
    cfg = load_config(config)
    cohort = load_cohort(cfg.cohort)
    labels = cohort.labels.to_numpy()
    enc = ClinicalEncoder(cohort.columns).fit(cohort.clinical_frame)
    clinical = enc.transform(cohort.clinical_frame).values
    fit = LogisticRegression(max_iter=500).fit(clinical, labels)
    assert roc_auc_score(labels, fit.predict_proba(clinical)[:, 1]) > 0.7
    # the share of key instances rises with the label, which moves a bag's mean
    means = [
        np.concatenate(
            [read_feature_file(cfg.features.dir / f"{s}.h5").features for s in cohort.slides_of(p)]
        ).mean(axis=0)
        for p in cohort.patients.index
    ]
    model = LogisticRegression(max_iter=500)
    scores = cross_val_predict(model, np.array(means), labels, cv=5, method="predict_proba")
    assert roc_auc_score(labels, scores[:, 1]) > 0.7


def test_too_few_patients_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 20 patients"):
        make_feature_cohort(tmp_path, patients=5)


def test_planted_key_instances_are_recorded_per_slide(synth_cohort):
    """key_instances.h5 marks, per slide, the instances drawn around the key prototype."""
    from bidistill.synthetic.features import KEY_INSTANCES, read_key_instances

    cfg = load_config(synth_cohort)
    cohort = load_cohort(cfg.cohort)
    features, keys, shares = [], [], {}
    for row in cohort.slides.itertuples():
        f = read_feature_file(cfg.features.dir / f"{row.slide_id}.h5").features
        key = read_key_instances(synth_cohort.parent / KEY_INSTANCES, row.slide_id)
        assert key.dtype == bool and key.shape == (len(f),)
        features.append(f)
        keys.append(key)
        shares.setdefault(row.patient_id, []).append(key)
    features, keys = np.concatenate(features), np.concatenate(keys)
    centre = features[keys].mean(axis=0)
    distance = np.linalg.norm(features - centre, axis=1)
    # key instances lie around one prototype, the others around other prototypes
    assert distance[keys].mean() < 0.8 * distance[~keys].mean()
    share = pd.Series({p: np.concatenate(k).mean() for p, k in shares.items()})
    labels = cohort.labels
    assert share[labels == 1].mean() > share[labels == 0].mean() + 0.1
