"""Synthetic feature cohorts that anyone can make offline (tests, demo, benchmarks): the slides
show one latent trait and a faint trace of another that the clinical table records (the model:
docs/internal-interfaces.md, "Synthetic data").
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from bidistill._io import atomic_path, write_csv, write_text
from bidistill.features.store import feature_path, write_feature_file

SYNTHETIC_ENCODER = "synthetic"
KEY_INSTANCES = "key_instances.h5"


def make_feature_cohort(
    out_dir: str | Path,
    *,
    patients: int = 200,
    seed: int = 0,
    dim: int = 64,
    instances: tuple[int, int] = (50, 300),
    two_slide_share: float = 0.1,
    no_clinical_share: float = 0.05,
    with_split: bool = True,
    progress: bool = False,
    config_name: str | None = "config.yaml",
) -> Path:
    """Write ``cohort.csv``, ``features/``, ``key_instances.h5`` and the config, whose path is
    returned; ``config_name=None`` writes none (``init --synthetic`` writes its own template)."""
    if patients < 20:
        raise ValueError(f"a synthetic cohort needs at least 20 patients, got {patients}")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    traits = _patient_traits(rng, patients)
    table = _clinical_table(rng, traits, no_clinical_share)
    prototypes = _prototypes(rng, dim)
    rows = []
    key_instances: dict[str, np.ndarray] = {}
    for i in tracked(range(patients), progress, "synthetic slides"):
        n_slides = 2 if rng.random() < two_slide_share else 1
        bag, is_key = _bag(
            rng, prototypes, traits["key_fraction"][i], traits["marker_fraction"][i], instances
        )
        parts = zip(np.array_split(bag, n_slides), np.array_split(is_key, n_slides))
        for s, (part, part_is_key) in enumerate(parts):
            slide_id = f"S{i:04d}" + (f"-{s + 1}" if n_slides > 1 else "")
            key_instances[slide_id] = part_is_key
            write_synthetic_features(out_dir, slide_id, part, SYNTHETIC_ENCODER)
            rows.append({"slide_id": slide_id, **table[i]})
    frame = pd.DataFrame(rows)
    if with_split:
        frame["split"] = frame["patient_id"].map(_splits(rng, traits["label"], table))
    # Shuffle rows so that a patient's slides are not adjacent (real tables are not sorted).
    frame = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    write_csv(out_dir / "cohort.csv", frame)
    # The planted key-instance masks, one bool dataset per slide id.
    with atomic_path(out_dir / KEY_INSTANCES) as tmp, h5py.File(tmp, "w") as h5:
        for slide_id, mask in key_instances.items():
            h5.create_dataset(slide_id, data=np.asarray(mask, dtype=bool))
    config_path = out_dir / (config_name or "config.yaml")
    if config_name is not None:
        write_text(config_path, feature_cohort_config(with_split=with_split))
    return config_path


def read_key_instances(path: str | Path, slide_id: str) -> np.ndarray:
    """The planted key-instance mask of one slide, bool [n] (see ``make_feature_cohort``)."""
    with h5py.File(path, "r") as h5:
        return np.asarray(h5[slide_id][()], dtype=bool)


def hottest_tile_key_shares(slides, cohort: Path, column: str) -> tuple[list[float], list[float]]:
    """Per slide holding key instances: the share of key instances among its top 10% tiles by
    ``column`` of ``slide.frame()`` (a heatmap's score), and the slide's own share (chance)."""
    hits, chance = [], []
    for slide in slides:
        key = read_key_instances(cohort / KEY_INSTANCES, slide.slide_id)
        tiles = slide.frame()
        if key.any():
            hottest = tiles.nlargest(max(1, len(tiles) // 10), column)
            hits.append(float(key[hottest["tile"]].mean()))
            chance.append(float(key.mean()))
    return hits, chance


def _patient_traits(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    w = rng.normal(size=n)  # seen by the slides only
    c = rng.normal(size=n)  # seen by the clinical table only
    score = 1.4 * w + 1.2 * c + rng.normal(scale=0.8, size=n)
    label = (score > np.quantile(score, 0.6)).astype(int)  # ~40% positive, like BCNB's N+
    # The slides see w through biological noise, as a biopsy samples only part of a tumour.
    key_fraction = _sigmoid(1.6 * (w + rng.normal(scale=0.6, size=n)) - 2.2)  # ≈ 3% to 60%
    marker_fraction = _sigmoid(1.5 * c - 1.5)  # ≈ 5% to 80% marker instances
    return {
        "c": c,
        "label": label,
        "key_fraction": key_fraction,
        "marker_fraction": marker_fraction,
    }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _clinical_table(rng, traits, no_clinical_share: float) -> list[dict]:
    c, label = traits["c"], traits["label"]
    n = len(c)
    age = np.round(52 + 6 * c + rng.normal(scale=9, size=n)).astype(int)
    size = np.clip(np.exp(0.9 + 0.25 * c + rng.normal(scale=0.3, size=n)), 0.3, 12)
    grade = np.clip(np.round(2 + 0.6 * c + rng.normal(scale=0.6, size=n)), 1, 3).astype(int)
    ki67 = np.clip(20 + 12 * c + rng.normal(scale=10, size=n), 1, 90)
    er_positive = rng.random(n) < 0.75 - 0.1 * np.tanh(c)
    subtype = rng.choice(["Luminal A", "Luminal B", "HER2(+)", "Triple negative"], size=n)
    no_clinical = rng.random(n) < no_clinical_share
    rows = []
    for i in range(n):
        row = {
            "patient_id": f"P{i:04d}",
            "nodal_status": "N+" if label[i] else "N0",
            # The label in disguise: must be refused as a feature (config leakage_columns).
            "positive_nodes": int(rng.integers(1, 9)) if label[i] else 0,
            "age": str(age[i]),
            "tumour_size_cm": _messy_number(rng, size[i]),
            "er": "Positive" if er_positive[i] else "Negative",
            "grade": str(grade[i]),
            "ki67": _messy_percent(rng, ki67[i]),
            "subtype": subtype[i],
        }
        for key in ("age", "tumour_size_cm", "er", "grade", "ki67", "subtype"):
            if no_clinical[i] or rng.random() < 0.06:
                row[key] = ""
        rows.append(row)
    return rows


def _messy_number(rng, value: float) -> str:
    text = f"{value:.1f}"
    roll = rng.random()
    if roll < 0.15:
        return text.replace(".", ",")  # decimal comma
    if roll < 0.25:
        return f" {text} "  # stray whitespace
    return text


def _messy_percent(rng, value: float) -> str:
    roll = rng.random()
    if value < 5 or roll < 0.05:
        return rng.choice(["＜5%", "<5%"])
    if value > 60 and roll < 0.5:
        return "＞30%"
    if roll < 0.3:
        lo = int(value // 10 * 10)
        return f"{lo}-{lo + 10}%"
    if roll < 0.45:
        return f"{value / 100:.2f}"
    return f"{value:.0f}%"


def _prototypes(rng, dim: int) -> dict[str, np.ndarray]:
    marker = rng.normal(size=dim)
    return {
        "background": rng.normal(size=(6, dim)).astype(np.float32),
        "key": rng.normal(size=dim).astype(np.float32),
        # A nudge of a third of the instance noise's norm: faint per instance, clear in a bag.
        "marker_shift": (0.08 * marker).astype(np.float32),
    }


def _bag(
    rng, prototypes, key_fraction: float, marker_fraction: float, instances: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """One patient's instances [n, D] and which of them are key instances, bool [n]."""
    n = int(rng.integers(instances[0], instances[1] + 1))
    n_key = rng.binomial(n, key_fraction)
    background = prototypes["background"][rng.integers(0, len(prototypes["background"]), n - n_key)]
    marked = rng.random(len(background)) < marker_fraction
    background = background + marked[:, None] * prototypes["marker_shift"]
    centres = np.concatenate([np.repeat(prototypes["key"][None], n_key, 0), background])
    bag = centres + rng.normal(scale=1.0, size=centres.shape)
    order = rng.permutation(n)
    return bag[order].astype(np.float32), order < n_key  # the first n_key centres are key


def write_synthetic_features(out_dir: Path, slide_id: str, features: np.ndarray, encoder: str):
    """``<out_dir>/features/<slide_id>.h5``, its instances laid out on a square grid of tiles."""
    side = int(np.ceil(np.sqrt(len(features))))
    idx = np.arange(len(features))
    coords = np.stack([idx % side, idx // side], axis=1).astype(np.int64) * 256
    path = feature_path(out_dir / "features", slide_id)
    write_feature_file(path, features, coords, encoder=encoder, patch_size=256, mpp=0.5)


def tracked(items, enabled: bool, description: str):
    """``items`` with a progress bar when ``enabled``."""
    if not enabled:
        return items
    from bidistill._progress import transient_track

    return transient_track(items, description)


def _splits(rng, labels: np.ndarray, table: list[dict]) -> dict[str, str]:
    """Stratified 60/20/20 train/val/test by patient."""
    names = {}
    for cls in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cut1, cut2 = int(0.6 * len(members)), int(0.8 * len(members))
        for j, i in enumerate(members):
            names[table[i]["patient_id"]] = "train" if j < cut1 else "val" if j < cut2 else "test"
    return names


def feature_cohort_config(*, with_split: bool = True) -> str:
    """The experiment config that goes with a synthetic feature cohort."""
    split_line = "  split_column: split\n" if with_split else ""
    return f"""\
# Experiment on a synthetic feature cohort made by `bidistill synth features`.
# The slide features are random vectors with a planted signal, not real histology.
name: synthetic
cohort:
  table: cohort.csv
  patient_column: patient_id
  slide_column: slide_id
  label:
    column: nodal_status
    positive: ["N+"]
    negative: ["N0"]
{split_line}  leakage_columns: [positive_nodes]
  clinical:
    - {{column: age, kind: numeric}}
    - {{column: tumour_size_cm, kind: numeric, parser: number}}
    - {{column: er, kind: binary, positive: [Positive]}}
    - {{column: grade, kind: ordinal, categories: ["1", "2", "3"]}}
    - {{column: ki67, kind: numeric, parser: percent}}
    - {{column: subtype, kind: categorical}}
features:
  dir: features
  encoder: {SYNTHETIC_ENCODER}
methods: [bd, wsi-only, clinical-only, fusion-mean, moddrop]
training:
  epochs: 20
  batch_size: 16
  patience: 6
  seed: 0
evaluation:
  mask_seeds: 10
  bootstrap: 1000
"""
