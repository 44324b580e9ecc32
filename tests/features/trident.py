"""Feature files written as TRIDENT writes them (``trident/IO.py`` ``save_h5`` and
``coords_to_h5``, ``wsi_objects/WSI.py`` ``extract_patch_features``), for tests."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


def save_h5(path: Path, assets: dict, attributes: dict) -> None:
    """TRIDENT's ``save_h5``: one resizable dataset per asset, its attributes beside it."""
    with h5py.File(path, "w") as file:
        for key, val in assets.items():
            dset = file.create_dataset(
                key,
                shape=val.shape,
                maxshape=(None,) + val.shape[1:],
                chunks=(1,) + val.shape[1:],
                dtype=val.dtype,
            )
            dset[:] = val
            for attr_key, attr_val in attributes.get(key, {}).items():
                dset.attrs[attr_key] = "None" if attr_val is None else attr_val


def write_trident_features(
    path: Path, features: np.ndarray, coords: np.ndarray, *, encoder: str | None, patch_size=256
) -> Path:
    """A feature file as TRIDENT's ``extract_patch_features`` writes it (20x tiles of a 40x
    slide): the encoder on ``features``, the patching settings on ``coords``."""
    coords_attrs = {  # coords_to_h5
        "patch_size": patch_size,
        "patch_size_level0": patch_size * 40 // 20,
        "level0_magnification": 40,
        "target_magnification": 20,
        "overlap": 0,
        "name": path.stem,
        "savetodir": str(path.parent),
        "level0_width": 100_000,
        "level0_height": 80_000,
    }
    features_attrs = {"name": path.stem, "savetodir": str(path.parent), "encoder": encoder}
    save_h5(
        path,
        {"features": features, "coords": np.asarray(coords, np.int64)},
        {"features": features_attrs, "coords": coords_attrs},
    )
    return path
