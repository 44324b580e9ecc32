"""A synthetic cohort of patch folders with a label the pixels show: end-to-end mode offline
(what the patches hold: docs/internal-interfaces.md). Same seed ⇒ the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from bidistill._io import atomic_path, write_csv, write_text

TINY_ENCODER = "timm:test_convnext"  # 0.2 M parameters, layer norm only (no batch statistics)


def make_patch_cohort(
    out_dir: str | Path,
    *,
    patients: int = 24,
    seed: int = 0,
    tile: int = 32,
    tiles: tuple[int, int] = (8, 16),
    signal: float = 1.0,
    encoder: str = TINY_ENCODER,
) -> Path:
    """Write ``cohort.csv``, ``slides/<slide_id>/<k>.png`` (``tiles``: patches per slide, in
    [low, high]) and ``config.yaml``, whose path is returned."""
    if patients < 12:
        raise ValueError(f"a synthetic patch cohort needs at least 12 patients, got {patients}")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    labels = np.array([i % 2 for i in range(patients)])
    rng.shuffle(labels)
    rows = []
    for i, label in enumerate(labels):
        pid = f"P{i + 1:03d}"
        n = int(rng.integers(tiles[0], tiles[1] + 1))
        share = (0.5 * signal * rng.uniform(0.6, 1.4)) if label else rng.uniform(0, 0.08)
        key = rng.random(n) < min(share, 1.0)
        folder = out_dir / "slides" / pid
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            _write_png(folder / f"{k:03d}.png", _patch(rng, tile, bool(key[k])))
        rows.append(_clinical_row(rng, pid, int(label)))
    table = pd.DataFrame(rows)
    table.insert(2, "split", _splits(labels, rng))
    write_csv(out_dir / "cohort.csv", table)
    config_path = out_dir / "config.yaml"
    write_text(config_path, patch_cohort_config(tile=tile, encoder=encoder))
    return config_path


def _patch(rng: np.random.Generator, size: int, key: bool) -> np.ndarray:
    """Stroma with pale nuclei; a key patch adds a cluster of large dark nuclei."""
    base = np.array([226, 178, 198], dtype=np.float64)
    image = base + rng.normal(0, 9, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    for _ in range(int(rng.integers(2, 5))):
        _disc(image, xx, yy, rng.uniform(0, size, 2), size * 0.05, (180, 140, 190), 0.6)
    if key:
        centre = rng.uniform(size * 0.25, size * 0.75, 2)
        for _ in range(int(rng.integers(5, 9))):
            where = centre + rng.normal(0, size * 0.15, 2)
            _disc(image, xx, yy, where, size * rng.uniform(0.07, 0.11), (70, 40, 120), 0.9)
    return np.clip(image, 0, 255).astype(np.uint8)


def _disc(image, xx, yy, centre, radius, colour, alpha) -> None:
    inside = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius**2
    image[inside] = (1 - alpha) * image[inside] + alpha * np.array(colour, dtype=np.float64)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def _clinical_row(rng: np.random.Generator, pid: str, label: int) -> dict:
    size = rng.normal(2.0 + 0.5 * label, 0.8)
    age = rng.normal(52, 10)
    grade = int(np.clip(round(rng.normal(2 + 0.3 * label, 0.7)), 1, 3))
    return {
        "patient_id": pid,
        "slide_id": pid,
        "label": "pos" if label else "neg",
        "age": "" if rng.random() < 0.1 else f"{age:.0f}",
        "size_cm": "" if rng.random() < 0.15 else f"{max(size, 0.3):.1f}",
        "grade": "" if rng.random() < 0.15 else str(grade),
    }


def _splits(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Stratified: half train, a quarter val, a quarter test, per class."""
    split = np.empty(len(labels), dtype=object)
    for value in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == value))
        n_val = n_test = max(1, len(members) // 4)
        split[members[:n_val]] = "val"
        split[members[n_val : n_val + n_test]] = "test"
        split[members[n_val + n_test :]] = "train"
    return split.tolist()


def patch_cohort_config(*, tile: int = 32, encoder: str = TINY_ENCODER) -> str:
    """The end-to-end experiment config of a synthetic patch cohort (small and fast)."""
    config = {
        "name": "synthetic-patches",
        "cohort": {
            "table": "cohort.csv",
            "patient_column": "patient_id",
            "slide_column": "slide_id",
            "label": {"column": "label", "positive": ["pos"], "negative": ["neg"]},
            "split_column": "split",
            "clinical": [
                {"column": "age", "kind": "numeric"},
                {"column": "size_cm", "kind": "numeric"},
                {"column": "grade", "kind": "ordinal", "categories": ["1", "2", "3"]},
            ],
            "splits": {"mode": "table"},
        },
        "slides": {"dir": "slides", "mpp": 0.5},
        "tiling": {"coords_dir": "coords", "patch_size": tile, "mpp": 0.5, "qc": False},
        "features": {"encoder": encoder, "random_init": True},
        "methods": ["bd", "wsi-only"],
        "training": {
            "mode": "end-to-end",
            "epochs": 4,
            "batch_size": 4,
            "lr": 1e-3,
            "weight_decay": 1e-4,
            "patience": 10,
            "device": "cpu",
            "seed": 0,
            "end_to_end": {"bag_size": 4, "micro_batch": 2, "eval_batch": 16, "input_size": tile},
        },
        "evaluation": {"mask_seeds": 2, "bootstrap": 50},
    }
    return "# synthetic patch folders, end-to-end mode (tests, demos)\n" + yaml.safe_dump(
        config, sort_keys=False
    )
