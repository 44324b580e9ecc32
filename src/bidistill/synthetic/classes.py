"""A three-class feature cohort whose Bayes-optimal posterior is exact, so that a method's macro
AUC reads as a gap to the best any method could reach (the K-class companion of ``latent``).

The model, fixed before any method was run on it:
- class y in {0, 1, 2} (written ``N0``, ``N+(1-2)``, ``N+(>2)``, as BCNB's three ALN classes),
  with prior ``prior``;
- a bag of n ~ U[instances] instances in ``dim`` dimensions, each independently a key instance
  with probability ``key_share[y]`` (x ~ N(key, I)) or else a background instance of one of
  ``prototypes`` tissue types, uniformly (x ~ N(background_t, I)): the classes differ in *how
  many* key instances a slide holds, an ordinal trait;
- clinical columns, each independently blank with probability ``blank_rate`` and all blank for
  a share ``no_clinical_share`` of patients (missing completely at random): ``size`` ~
  N(size_shift · y, 1) written with four decimals, ``grade`` the latent N(grade_shift · [y ≥ 1],
  1) cut at (-0.5, 0.8) into 1, 2, 3, and ``age`` ~ N(55, 10) with no signal.
Given y, the instances and the clinical values are independent, so the posterior is
prior · Π_i p(x_i | y) · Π_f p(value_f | y), computed exactly (log-sum-exp over the mixture).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import log_ndtr, logsumexp
from scipy.stats import norm

from bidistill._io import write_csv, write_text
from bidistill.synthetic.features import tracked, write_synthetic_features
from bidistill.synthetic.latent import synthetic_cohort_config

CLASSES = ("N0", "N+(1-2)", "N+(>2)")
CLASS_ENCODER = "synthetic-classes"
BAYES = "bayes.csv"
GRADE_CUTS = (-0.5, 0.8)


@dataclass(frozen=True)
class ClassSpec:
    name: str = "three-class"
    patients: int = 1000  # training + validation
    test_patients: int = 1000
    val_share: float = 0.25
    prior: tuple[float, float, float] = (0.45, 0.30, 0.25)
    dim: int = 16
    instances: tuple[int, int] = (20, 100)
    prototypes: int = 4
    key_distance: float = 2.0
    key_share: tuple[float, float, float] = (0.02, 0.05, 0.09)
    size_shift: float = 0.6
    grade_shift: float = 1.0
    blank_rate: float = 0.05
    no_clinical_share: float = 0.05


@dataclass
class DrawnClasses:
    spec: ClassSpec
    background: np.ndarray  # [T, D]
    key: np.ndarray  # [D]
    labels: np.ndarray  # [n]
    splits: list[str]
    table: list[dict]  # patient_id, outcome and the clinical columns as written
    bags: list[np.ndarray]  # [n_i, D] float32

    def posteriors(self, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """P(y | bag, clinical row) and P(y | bag), each ``[len(indices), 3]``."""
        log_prior = np.log(np.asarray(self.spec.prior))
        present, absent = [], []
        for i in indices:
            bag_part = log_prior + self._bag_loglik(self.bags[i].astype(np.float64))
            both = bag_part + self._clinical_loglik(self.table[i])
            absent.append(np.exp(bag_part - logsumexp(bag_part)))
            present.append(np.exp(both - logsumexp(both)))
        return np.array(present), np.array(absent)

    def _bag_loglik(self, bag: np.ndarray) -> np.ndarray:
        # log N(x; mu, I) up to a constant shared by every component: -|x - mu|^2 / 2
        key = -0.5 * np.sum((bag - self.key) ** 2, axis=1)
        tissue = -0.5 * np.sum((bag[:, None] - self.background[None]) ** 2, axis=2)
        background = logsumexp(tissue, axis=1) - np.log(len(self.background))
        share = np.asarray(self.spec.key_share)
        mixture = np.logaddexp(
            np.log(share)[None] + key[:, None], np.log1p(-share)[None] + background[:, None]
        )
        return mixture.sum(axis=0)

    def _clinical_loglik(self, row: dict) -> np.ndarray:
        spec, classes = self.spec, np.arange(3)
        out = np.zeros(3)
        if row["size"] != "":
            out += norm.logpdf(float(row["size"]), loc=spec.size_shift * classes)
        if row["grade"] != "":
            mean = spec.grade_shift * (classes >= 1)
            edges = np.r_[-np.inf, GRADE_CUTS, np.inf]
            g = int(row["grade"]) - 1
            upper, lower = log_ndtr(edges[g + 1] - mean), log_ndtr(edges[g] - mean)
            out += upper + np.log1p(-np.exp(lower - upper))
        return out  # age carries no signal: the same factor for every class


def draw_class_cohort(spec: ClassSpec, *, seed: int = 0) -> DrawnClasses:
    rng = np.random.default_rng(seed)
    background = rng.normal(size=(spec.prototypes, spec.dim)) * 1.5
    direction = rng.normal(size=spec.dim)
    key = spec.key_distance * direction / np.linalg.norm(direction)
    n = spec.patients + spec.test_patients
    labels = rng.choice(3, size=n, p=np.asarray(spec.prior))
    splits = _splits(rng, spec, labels)
    table = _clinical_table(rng, spec, labels)
    bags = []
    for y in labels:
        m = int(rng.integers(spec.instances[0], spec.instances[1] + 1))
        is_key = rng.random(m) < spec.key_share[y]
        tissue = rng.integers(0, spec.prototypes, size=m)
        centres = np.where(is_key[:, None], key, background[tissue])
        bags.append((centres + rng.normal(size=(m, spec.dim))).astype(np.float32))
    return DrawnClasses(spec, background, key, labels, splits, table, bags)


def _splits(rng, spec: ClassSpec, labels: np.ndarray) -> list[str]:
    """The first ``patients``: train/val stratified by class; the rest: test."""
    names = ["test"] * len(labels)
    for k in range(3):
        members = rng.permutation(np.flatnonzero(labels[: spec.patients] == k))
        n_val = int(round(spec.val_share * len(members)))
        for j, i in enumerate(members):
            names[i] = "val" if j < n_val else "train"
    return names


def _clinical_table(rng, spec: ClassSpec, labels: np.ndarray) -> list[dict]:
    n = len(labels)
    size = spec.size_shift * labels + rng.normal(size=n)
    grade = np.searchsorted(GRADE_CUTS, spec.grade_shift * (labels >= 1) + rng.normal(size=n)) + 1
    age = 55 + 10 * rng.normal(size=n)
    none = rng.random(n) < spec.no_clinical_share
    rows = []
    for i in range(n):
        values = {"size": f"{size[i]:.4f}", "grade": str(int(grade[i])), "age": f"{age[i]:.1f}"}
        blank = none[i] | (rng.random(3) < spec.blank_rate)
        row = {"patient_id": f"P{i:05d}", "outcome": CLASSES[labels[i]]}
        rows.append(row | {k: "" if b else v for (k, v), b in zip(values.items(), blank)})
    return rows


def make_class_cohort(
    spec: ClassSpec, out_dir: str | Path, *, seed: int = 0, progress: bool = False
) -> Path:
    """Write ``cohort.csv``, ``features/``, ``bayes.csv`` (the test patients' exact
    posteriors, ``bayes_present_<k>`` and ``bayes_absent_<k>``) and ``config.yaml`` (returned)."""
    out_dir = Path(out_dir)
    drawn = draw_class_cohort(spec, seed=seed)
    rows = []
    for i in tracked(range(len(drawn.bags)), progress, f"{spec.name}: feature files"):
        slide_id = f"S{i:05d}"
        write_synthetic_features(out_dir, slide_id, drawn.bags[i], CLASS_ENCODER)
        rows.append({"slide_id": slide_id, **drawn.table[i], "split": drawn.splits[i]})
    write_csv(out_dir / "cohort.csv", pd.DataFrame(rows))
    test = [i for i, s in enumerate(drawn.splits) if s == "test"]
    present, absent = drawn.posteriors(test)
    bayes = pd.DataFrame(
        {
            "patient_id": [drawn.table[i]["patient_id"] for i in test],
            "label": drawn.labels[test],
            **{f"bayes_present_{k}": present[:, k] for k in range(3)},
            **{f"bayes_absent_{k}": absent[:, k] for k in range(3)},
        }
    )
    write_csv(out_dir / BAYES, bayes)
    config_path = out_dir / "config.yaml"
    write_text(config_path, class_cohort_config(spec))
    return config_path


def class_cohort_config(spec: ClassSpec) -> str:
    label = ["classes:", *(f'  "{name}": ["{name}"]' for name in CLASSES)]
    clinical = [
        "    - {column: size, kind: numeric}",
        '    - {column: grade, kind: ordinal, categories: ["1", "2", "3"]}',
        "    - {column: age, kind: numeric}",
    ]
    origin = f"A three-class cohort `{spec.name}` (bidistill.synthetic.classes)"
    return synthetic_cohort_config(spec.name, origin, "", label, clinical, CLASS_ENCODER)
