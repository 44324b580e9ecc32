"""The .h5 feature store (DESIGN contract, the layout CLAM and TRIDENT write).

``<features_dir>/<slide_id>.h5``: dataset ``features`` float32/float16 ``[n, D]``, dataset
``coords`` int64 ``[n, 2]`` (level-0 x, y of each tile's top-left corner), attributes ``encoder``,
``patch_size``, ``mpp``, ``level``, ``bidistill_version``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bidistill import __version__
from bidistill._io import atomic_path, h5_attrs
from bidistill.errors import FeatureFileError

REQUIRED_ATTRS = ("encoder", "patch_size", "mpp", "level")


@dataclass
class FeatureFile:
    features: np.ndarray  # [n, D]
    coords: np.ndarray  # [n, 2] int64, level-0 x, y
    attrs: dict[str, Any] = field(default_factory=dict)


def feature_path(features_dir: str | Path, slide_id: str) -> Path:
    return Path(features_dir) / f"{slide_id}.h5"


def write_feature_file(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    *,
    encoder: str,
    patch_size: int,
    mpp: float,
    level: int = 0,
    extra_attrs: dict[str, Any] | None = None,
) -> Path:
    """Write one slide's features atomically.

    Side effects: creates ``path`` (and its folder); an existing file is replaced only when the
    new one is complete.
    """
    features = np.asarray(features)
    coords = np.asarray(coords, dtype=np.int64)
    if features.ndim != 2 or features.dtype not in (np.float32, np.float16):
        raise FeatureFileError(
            f"{path}: features must be float32/float16 [n, D], got {features.dtype} "
            f"{features.shape}"
        )
    if coords.shape != (len(features), 2):
        raise FeatureFileError(
            f"{path}: coords must be [n, 2] with n={len(features)}, got {coords.shape}"
        )
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("features", data=features)
        h5.create_dataset("coords", data=coords)
        attrs = {
            "encoder": encoder,
            "patch_size": int(patch_size),
            "mpp": float(mpp),
            "level": int(level),
            "bidistill_version": __version__,
            **(extra_attrs or {}),
        }
        h5.attrs.update(attrs)
    return path


def read_feature_file(path: str | Path, *, with_coords: bool = True) -> FeatureFile:
    """Read a feature file written by bidistill, CLAM or TRIDENT.

    Raises:
        FeatureFileError: missing file, not HDF5, or datasets of the wrong shape; the message
            names the file and says how to rebuild it.
    """
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(
            f"{path}: feature file not found (extract it with `bidistill extract`)"
        )
    try:
        with h5py.File(path, "r") as h5:
            if "features" not in h5:
                raise FeatureFileError(f"{path}: no 'features' dataset (found {list(h5)})")
            features = h5["features"][()]
            coords = h5["coords"][()] if with_coords and "coords" in h5 else None
            attrs = h5_attrs(h5)
    except OSError as err:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({err})") from err
    if features.ndim == 3 and features.shape[0] == 1:  # CLAM's older [1, n, D] layout
        features = features[0]
    if features.ndim != 2:
        raise FeatureFileError(f"{path}: 'features' must be [n, D], got {features.shape}")
    if coords is None:
        coords = np.zeros((len(features), 2), dtype=np.int64)
    elif coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    return FeatureFile(features=features, coords=np.asarray(coords, np.int64), attrs=attrs)


def feature_dim(path: str | Path) -> int:
    """D of a feature file, read without loading the features."""
    with h5py.File(path, "r") as h5:
        return int(h5["features"].shape[-1])
