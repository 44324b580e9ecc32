"""Latent-trait feature cohorts whose Bayes-optimal posterior is known exactly, so a method's AUC
reads as a gap to the best AUC any method could reach on the same patients. The model and why its
posterior is exact: docs/internal-interfaces.md ("Latent-trait cohorts").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from scipy.optimize import brentq
from scipy.special import expit, log_ndtr, logsumexp, ndtr

from bidistill._io import write_csv, write_text
from bidistill.synthetic.features import tracked, write_synthetic_features

LATENT_ENCODER = "synthetic-latent"
BAYES = "bayes.csv"

# Quadrature grids. The v posterior is the narrowest (large bags pin the key share down): a
# step of 0.05 keeps the trapezoid error of a Gaussian with sd 0.08 below 1e-10.
_V_GRID = np.linspace(-6.0, 6.0, 241)
_C_GRID = np.linspace(-5.0, 5.0, 101)
_DIFFUSE_AXES = 3  # coordinates 0, 1, 2 of the unrotated space: the w, c and z directions


@dataclass(frozen=True)
class ClinicalFeature:
    """One clinical column and how it is drawn from its ``source``: ``c`` (``strength``: the
    correlation of the column's latent with c), ``z``, ``label`` (``strength``: the latent's shift
    between the classes) or ``none``. Ordinal and binary columns cut the latent at ``cuts``;
    numeric ones write ``mean + scale · latent``; ``levels``: categorical (``none`` only)."""

    column: str
    kind: Literal["numeric", "ordinal", "binary", "categorical"]
    source: Literal["c", "z", "label", "none"]
    strength: float = 0.7
    cuts: tuple[float, ...] = ()
    mean: float = 0.0
    scale: float = 1.0
    levels: tuple[str, ...] = ()


DEFAULT_CLINICAL = (
    ClinicalFeature("age", "numeric", "c", 0.35, mean=55, scale=10),
    ClinicalFeature("tumour_size_cm", "numeric", "c", 0.6, mean=2.5, scale=1.0),
    ClinicalFeature("grade", "ordinal", "c", 0.65, cuts=(-0.6, 0.7)),
    ClinicalFeature("ki67", "numeric", "c", 0.7, mean=25, scale=12),
    ClinicalFeature("er", "binary", "c", 0.4, cuts=(-0.7,)),
    ClinicalFeature("subtype", "categorical", "none", levels=("A", "B", "C", "D")),
)


@dataclass(frozen=True)
class LatentSpec:
    """A cohort generator: the model of the module docstring with its parameters."""

    name: str
    description: str = ""
    patients: int = 1000  # training + validation patients
    test_patients: int = 1000
    val_share: float = 0.25
    dim: int = 32
    instances: tuple[int, int] = (20, 100)
    two_slide_share: float = 0.1
    prevalence: float = 0.4
    # label
    beta_w: float = 1.4
    beta_c: float = 1.2
    beta_z: float = 0.0
    interaction: float = 0.0
    label_noise: float = 0.8
    # slides
    slide_noise: float = 0.6
    w_signal: Literal["key", "diffuse"] = "key"
    key_slope: float = 1.6
    key_offset: float = -2.2
    key_distance: float = 2.5
    diffuse_w: float = 0.3
    c_trace: Literal["none", "marker", "diffuse"] = "marker"
    marker_slope: float = 1.5
    marker_offset: float = -1.5
    marker_shift: float = 0.5
    diffuse_c: float = 0.1
    z_share: float = 0.0  # 0: no subtype
    diffuse_z: float = 0.0
    prototypes: int = 6
    prototype_scale: float = 1.0
    # clinical table
    clinical: tuple[ClinicalFeature, ...] = DEFAULT_CLINICAL
    blank_rate: float = 0.05
    no_clinical_share: float = 0.05
    train_no_clinical_share: float = 0.0


@dataclass
class _World:
    """The fixed random structure of one cohort: prototypes and the affine feature map."""

    background: np.ndarray  # [K, D] in the unrotated space (zero on the diffuse axes)
    key: np.ndarray  # [D]
    marker: np.ndarray  # [D]
    rotation: np.ndarray  # [D, D] orthogonal
    scales: np.ndarray  # [D]
    offset: np.ndarray  # [D]

    def to_features(self, x: np.ndarray) -> np.ndarray:
        return ((x @ self.rotation.T) * self.scales + self.offset).astype(np.float32)

    def from_features(self, features: np.ndarray) -> np.ndarray:
        return ((features.astype(np.float64) - self.offset) / self.scales) @ self.rotation


@dataclass
class _Patients:
    w: np.ndarray
    v: np.ndarray
    c: np.ndarray
    z: np.ndarray
    label: np.ndarray


def make_latent_cohort(
    spec: LatentSpec, out_dir: str | Path, *, seed: int = 0, progress: bool = False
) -> Path:
    """Write ``cohort.csv``, ``features/``, ``config.yaml`` (returned) and ``bayes.csv`` (the
    exact posteriors of the test patients) of a cohort of ``spec``."""
    out_dir = Path(out_dir)
    drawn = draw_latent_cohort(spec, seed=seed)
    rows = []
    for i in tracked(range(len(drawn.bags)), progress, f"{spec.name}: feature files"):
        for slide_id, part in drawn.slides[i]:
            write_synthetic_features(out_dir, slide_id, part, LATENT_ENCODER)
            rows.append({"slide_id": slide_id, **drawn.table[i], "split": drawn.splits[i]})
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    write_csv(out_dir / "cohort.csv", frame)
    test = [i for i in range(len(drawn.bags)) if drawn.splits[i] == "test"]
    write_csv(out_dir / BAYES, drawn.posterior_frame(test))
    config_path = out_dir / "config.yaml"
    write_text(config_path, latent_cohort_config(spec))
    return config_path


@dataclass
class DrawnCohort:
    """A drawn cohort in memory: what ``make_latent_cohort`` writes, and the means to compute
    the exact posterior of any of its patients."""

    spec: LatentSpec
    world: _World
    patients: _Patients
    splits: list[str]
    table: list[dict]  # one row per patient: patient_id, outcome and the clinical columns
    bags: list[np.ndarray]  # [n_i, D] float32 per patient
    slides: list[list[tuple[str, np.ndarray]]]  # (slide id, features) per patient

    def posterior_frame(self, indices: list[int]) -> pd.DataFrame:
        """``patient_id, split, label, bayes_present, bayes_absent`` for the given patients."""
        posterior = bayes_posteriors(
            self.spec, self.world, [self.bags[i] for i in indices], [self.table[i] for i in indices]
        )
        return pd.DataFrame(
            {
                "patient_id": [self.table[i]["patient_id"] for i in indices],
                "split": [self.splits[i] for i in indices],
                "label": self.patients.label[indices],
                "bayes_present": posterior[:, 0],
                "bayes_absent": posterior[:, 1],
            }
        )


def draw_latent_cohort(spec: LatentSpec, *, seed: int = 0) -> DrawnCohort:
    """Draw a cohort of ``spec`` in memory (``make_latent_cohort`` writes this one)."""
    _check_spec(spec)
    rng = np.random.default_rng(seed)
    world = _make_world(rng, spec)
    n = spec.patients + spec.test_patients
    patients = _draw_patients(rng, spec, n)
    splits = _splits(rng, spec, patients.label)
    table = _clinical_table(rng, spec, patients, splits)
    bags, slides = [], []
    for i in range(n):
        bag = _draw_bag(rng, spec, world, patients.v[i], patients.c[i], patients.z[i])
        bags.append(bag)
        n_slides = 2 if rng.random() < spec.two_slide_share else 1
        slides.append(
            [
                (f"S{i:05d}" + (f"-{s + 1}" if n_slides > 1 else ""), part)
                for s, part in enumerate(np.array_split(bag, n_slides))
            ]
        )
    return DrawnCohort(spec, world, patients, splits, table, bags, slides)


def _check_spec(spec: LatentSpec) -> None:
    if spec.dim < _DIFFUSE_AXES + 2:
        raise ValueError(f"{spec.name}: dim must be at least {_DIFFUSE_AXES + 2}")
    if not 0 < spec.prevalence < 1:
        raise ValueError(f"{spec.name}: prevalence must lie in (0, 1)")
    if spec.patients < 20:
        raise ValueError(f"{spec.name}: at least 20 training and validation patients")


# --- drawing ------------------------------------------------------------------------------------


def _make_world(rng: np.random.Generator, spec: LatentSpec) -> _World:
    d = spec.dim
    free = d - _DIFFUSE_AXES

    def on_free_axes(vector: np.ndarray) -> np.ndarray:
        out = np.zeros(vector.shape[:-1] + (d,))
        out[..., _DIFFUSE_AXES:] = vector
        return out

    def unit(size: int) -> np.ndarray:
        u = rng.normal(size=size)
        return u / np.linalg.norm(u)

    background = on_free_axes(rng.normal(scale=spec.prototype_scale, size=(spec.prototypes, free)))
    key = background[0] + spec.key_distance * on_free_axes(unit(free))
    marker = spec.marker_shift * on_free_axes(unit(free))
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    scales = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=d))
    offset = rng.normal(scale=0.5, size=d)
    return _World(background, key, marker, rotation, scales, offset)


def _threshold(spec: LatentSpec) -> float:
    """t such that P(y = 1) is the spec's prevalence."""
    weights = [1.0] if spec.z_share == 0 else [1 - spec.z_share, spec.z_share]

    def prevalence(t: float) -> float:
        total = 0.0
        for z, p_z in enumerate(weights):
            b = _w_slope(spec, z)
            sd = np.sqrt(b**2 + spec.beta_c**2 + spec.label_noise**2)
            total += p_z * ndtr((spec.beta_z * z - t) / sd)
        return total - spec.prevalence

    return brentq(prevalence, -20, 20)


def _w_slope(spec: LatentSpec, z) -> np.ndarray:
    return spec.beta_w * (1 + spec.interaction * (2 * np.asarray(z) - 1))


def _draw_patients(rng: np.random.Generator, spec: LatentSpec, n: int) -> _Patients:
    w = rng.normal(size=n)
    c = rng.normal(size=n)
    z = (rng.random(n) < spec.z_share).astype(int)
    score = _w_slope(spec, z) * w + spec.beta_c * c + spec.beta_z * z
    label = (score + rng.normal(scale=spec.label_noise, size=n) > _threshold(spec)).astype(int)
    v = w + rng.normal(scale=spec.slide_noise, size=n)
    return _Patients(w=w, v=v, c=c, z=z, label=label)


def _key_share(spec: LatentSpec, v):
    return expit(spec.key_slope * v + spec.key_offset) if spec.w_signal == "key" else 0.0 * v


def _marker_share(spec: LatentSpec, c):
    return (
        expit(spec.marker_slope * c + spec.marker_offset) if spec.c_trace == "marker" else 0.0 * c
    )


def _shift(spec: LatentSpec, v: float, c: float, z: int) -> np.ndarray:
    shift = np.zeros(spec.dim)
    shift[0] = spec.diffuse_w * v if spec.w_signal == "diffuse" else 0.0
    shift[1] = spec.diffuse_c * c if spec.c_trace == "diffuse" else 0.0
    shift[2] = spec.diffuse_z * z
    return shift


def _draw_bag(rng, spec: LatentSpec, world: _World, v: float, c: float, z: int) -> np.ndarray:
    n = int(rng.integers(spec.instances[0], spec.instances[1] + 1))
    is_key = rng.random(n) < _key_share(spec, v)
    tissue = rng.integers(0, len(world.background), size=n)
    marked = (rng.random(n) < _marker_share(spec, c)) & ~is_key
    centres = np.where(is_key[:, None], world.key, world.background[tissue])
    centres = centres + marked[:, None] * world.marker + _shift(spec, v, c, z)
    x = centres + rng.normal(size=(n, spec.dim))
    return world.to_features(x)


def _clinical_table(rng, spec: LatentSpec, patients: _Patients, splits: list[str]) -> list[dict]:
    n = len(patients.c)
    none = rng.random(n) < spec.no_clinical_share
    none |= (rng.random(n) < spec.train_no_clinical_share) & (np.asarray(splits) == "train")
    rows = [
        {"patient_id": f"P{i:05d}", "outcome": "pos" if patients.label[i] else "neg"}
        for i in range(n)
    ]
    for feature in spec.clinical:
        values = _feature_values(rng, feature, patients)
        blank = none | (rng.random(n) < spec.blank_rate)
        for i in range(n):
            rows[i][feature.column] = "" if blank[i] else values[i]
    return rows


def _feature_values(rng, feature: ClinicalFeature, patients: _Patients) -> list[str]:
    n = len(patients.c)
    if feature.source == "none":
        return list(rng.choice(feature.levels, size=n))
    if feature.source == "z":
        return [str(int(z)) for z in patients.z]
    rho = feature.strength
    if feature.source == "c":
        latent = rho * patients.c + np.sqrt(1 - rho**2) * rng.normal(size=n)
    else:  # label: a shift of ``strength`` between the classes
        latent = rho * patients.label + rng.normal(size=n)
    if feature.kind == "numeric":
        return [f"{feature.mean + feature.scale * x:.4f}" for x in latent]
    level = np.searchsorted(np.asarray(feature.cuts), latent)  # cuts below the latent
    return [str(int(k) + (1 if feature.kind == "ordinal" else 0)) for k in level]


def _splits(rng, spec: LatentSpec, labels: np.ndarray) -> list[str]:
    """The first ``patients`` patients: stratified train/val; the rest: test."""
    names = ["test"] * len(labels)
    cohort = np.arange(spec.patients)
    for cls in (0, 1):
        members = rng.permutation(cohort[labels[: spec.patients] == cls])
        n_val = int(round(spec.val_share * len(members)))
        for j, i in enumerate(members):
            names[i] = "val" if j < n_val else "train"
    return names


# --- the exact posterior ------------------------------------------------------------------------


def bayes_posteriors(
    spec: LatentSpec, world: _World, bags: list[np.ndarray], rows: list[dict]
) -> np.ndarray:
    """P(y = 1 | bag, clinical row) and P(y = 1 | bag), ``[n, 2]``, for features as written."""
    grid = _Grid(spec)
    out = np.zeros((len(bags), 2))
    for i, (bag, row) in enumerate(zip(bags, rows)):
        log_bag = grid.log_prior + _bag_loglik(spec, world, grid, bag)
        log_clinical, log_label_ratio = _clinical_loglik(spec, grid, row)
        out[i, 0] = grid.posterior(log_bag + log_clinical, log_label_ratio)
        out[i, 1] = grid.posterior(log_bag, 0.0)
    return out


class _Grid:
    """(z, v, c) quadrature points, their log prior and P(y = 1 | v, c, z)."""

    def __init__(self, spec: LatentSpec):
        zs = np.array([0, 1]) if spec.z_share > 0 else np.array([0])
        self.z = zs[:, None, None]
        self.v = _V_GRID[None, :, None]
        self.c = _C_GRID[None, None, :]
        var_v = 1 + spec.slide_noise**2
        p_z = np.where(zs == 1, spec.z_share, 1 - spec.z_share)
        self.log_prior = np.log(p_z)[:, None, None] - self.v**2 / (2 * var_v) - self.c**2 / 2
        # w | v ~ N(v / var_v, slide_noise² / var_v): the probit integrates in closed form.
        b = _w_slope(spec, self.z)
        mean = b * self.v / var_v + spec.beta_c * self.c + spec.beta_z * self.z - _threshold(spec)
        sd = np.sqrt(spec.label_noise**2 + b**2 * spec.slide_noise**2 / var_v)
        self.p_label = ndtr(mean / sd)

    def posterior(self, log_joint: np.ndarray, log_label_ratio: float) -> float:
        """P(y = 1) from the unnormalised log posterior over the grid, times the likelihood
        ratio p(row | y = 1) / p(row | y = 0) of the columns that depend on the label."""
        weights = np.exp(log_joint - log_joint.max())
        p = float((weights * self.p_label).sum() / weights.sum())
        p = min(max(p, 1e-15), 1 - 1e-15)
        odds = np.log(p) - np.log1p(-p) + log_label_ratio
        return float(expit(odds))


def _bag_loglik(spec: LatentSpec, world: _World, grid: _Grid, bag: np.ndarray) -> np.ndarray:
    """log p(bag | z, v, c) up to a constant, on the grid."""
    x = world.from_features(bag)  # [n, D] in the unrotated space
    n = len(x)
    # Diffuse shifts: each instance's coordinate is N(shift, 1) on its own axis.
    out = np.zeros(np.broadcast_shapes(grid.z.shape, grid.v.shape, grid.c.shape))
    diffuse = (
        (spec.w_signal == "diffuse", spec.diffuse_w * grid.v),
        (spec.c_trace == "diffuse", spec.diffuse_c * grid.c),
        (bool(spec.diffuse_z), spec.diffuse_z * grid.z),
    )
    for axis, (shifted, a) in enumerate(diffuse):
        if shifted:
            out = out + a * x[:, axis].sum() - n * a**2 / 2
    # Mixture over instance kinds: key, plain tissue, marked tissue (free axes only).
    free = x[:, _DIFFUSE_AXES:]

    def log_density(centres: np.ndarray) -> np.ndarray:  # [n] log mean_k N(x; centre_k, I)
        d2 = ((free[:, None, :] - centres[None, :, _DIFFUSE_AXES:]) ** 2).sum(-1)
        return logsumexp(-d2 / 2, axis=1) - np.log(len(centres))

    log_tissue = log_density(world.background)
    log_key = log_density(world.key[None]) if spec.w_signal == "key" else None
    log_marked = log_density(world.background + world.marker) if spec.c_trace == "marker" else None
    if log_key is None and log_marked is None:
        return out
    top = np.maximum.reduce([t for t in (log_tissue, log_key, log_marked) if t is not None])
    # Densities relative to each instance's largest (so in (0, 1]); the sum over instances of
    # the log mixture is accumulated in float64, the per-instance terms in float32 (relative
    # error 1e-7 on terms of order 1: far below what changes a posterior).
    tissue = np.exp(log_tissue - top).astype(np.float32)[:, None, None]  # [n, 1, 1]
    if log_marked is not None:
        m = _marker_share(spec, _C_GRID).astype(np.float32)[None, None, :]  # [1, 1, Gc]
        marked = np.exp(log_marked - top).astype(np.float32)[:, None, None]
        tissue = tissue + m * (marked - tissue)
    if log_key is not None:
        f = _key_share(spec, _V_GRID).astype(np.float32)[None, :, None]  # [1, Gv, 1]
        key = np.exp(log_key - top).astype(np.float32)[:, None, None]
        mix = f * key + (1 - f) * tissue
    else:
        mix = tissue
    return out + np.log(mix).sum(axis=0, dtype=np.float64)[None]


def _clinical_loglik(spec: LatentSpec, grid: _Grid, row: dict) -> tuple[np.ndarray, float]:
    """log p(observed cells | c, z) on the grid, and the log likelihood ratio of the cells that
    depend on the label directly (blank cells contribute nothing: they are blank at random)."""
    log_lik = np.zeros((grid.z.shape[0], 1, len(_C_GRID)))
    ratio = 0.0
    for feature in spec.clinical:
        value = row.get(feature.column, "")
        if value == "" or feature.source == "none":
            continue
        if feature.source == "z":
            log_lik = log_lik + np.where(grid.z == int(value), 0.0, -np.inf)
            continue
        if feature.source == "c":
            rho = feature.strength
            mean, sd = rho * _C_GRID, np.sqrt(1 - rho**2)
            log_lik = log_lik + _latent_loglik(feature, value, mean, sd)[None, None, :]
        else:  # label
            ratio += float(
                _latent_loglik(feature, value, feature.strength, 1.0)
                - _latent_loglik(feature, value, 0.0, 1.0)
            )
    return log_lik, ratio


def _latent_loglik(feature: ClinicalFeature, value: str, mean, sd):
    """log p(value | latent ~ N(mean, sd²)) for a numeric, ordinal or binary column."""
    if feature.kind == "numeric":
        x = (float(value) - feature.mean) / feature.scale
        return -((x - mean) ** 2) / (2 * sd**2)
    level = int(value) - (1 if feature.kind == "ordinal" else 0)
    cuts = np.concatenate([[-np.inf], feature.cuts, [np.inf]])
    lower, upper = (cuts[level] - mean) / sd, (cuts[level + 1] - mean) / sd
    # log(Φ(upper) - Φ(lower)), computed on the side of the distribution where it is stable.
    upper, lower = np.broadcast_arrays(upper, lower)
    flip = lower > 0
    hi = np.where(flip, -lower, upper)
    lo = np.where(flip, -upper, lower)
    return log_ndtr(hi) + np.log1p(-np.exp(np.minimum(log_ndtr(lo) - log_ndtr(hi), 0.0)))


# --- config -------------------------------------------------------------------------------------


def latent_cohort_config(spec: LatentSpec) -> str:
    """The experiment config of a latent cohort (methods, training, evaluation: the defaults)."""
    lines = []
    for feature in spec.clinical:
        entry = f"    - {{column: {feature.column}, kind: {feature.kind}"
        if feature.kind == "ordinal":
            levels = [str(k + 1) for k in range(len(feature.cuts) + 1)]
            entry += f", categories: {levels}"
        if feature.kind == "binary":
            entry += ', positive: ["1"]'
        lines.append(entry + "}")
    origin = f"A latent-trait cohort `{spec.name}` (bidistill.synthetic.latent)"
    label = ["positive: [pos]", "negative: [neg]"]
    return synthetic_cohort_config(
        spec.name, origin, spec.description, label, lines, LATENT_ENCODER
    )


def synthetic_cohort_config(
    name: str, origin: str, description: str, label: list[str], clinical: list[str], encoder: str
) -> str:
    """The experiment config of a synthetic cohort with a known posterior: its table, label
    lines (under ``label:``, after ``column: outcome``), clinical entries and encoder name; the
    methods, training and evaluation are the defaults."""
    label_lines = "\n".join(f"    {line}" for line in label)
    clinical_lines = "\n".join(clinical)
    about = f"# exactly known Bayes-optimal posterior (bayes.csv). {description}".rstrip()
    return f"""\
# {origin}: synthetic features with an
{about}
name: {name}
cohort:
  table: cohort.csv
  patient_column: patient_id
  slide_column: slide_id
  label:
    column: outcome
{label_lines}
  split_column: split
  clinical:
{clinical_lines}
features:
  dir: features
  encoder: {encoder}
"""
