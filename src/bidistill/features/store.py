"""The .h5 feature files (DESIGN contract, the layout CLAM and TRIDENT write) and the store that
serves them to training and prediction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from bidistill import __version__
from bidistill._io import atomic_h5, h5_attrs
from bidistill._paths import find_named
from bidistill.errors import FeatureFileError
from bidistill.features.hygiene import (
    available_memory_bytes,
    check_layout,
    check_values,
    checked_shape,
    scan_values,
)
from bidistill.features.identity import FeatureIdentity, common_identity
from bidistill.features.interop import coords_dataset_attrs

log = logging.getLogger(__name__)

REQUIRED_ATTRS = ("encoder", "patch_size", "mpp", "level")


@dataclass
class FeatureFile:
    features: np.ndarray  # [n, D]
    coords: np.ndarray  # [n, 2] int64, level-0 x, y
    attrs: dict[str, Any] = field(default_factory=dict)


def feature_path(features_dir: str | Path, slide_id: str) -> Path:
    """``<features_dir>/<slide_id>.h5`` (kept inside ``features_dir``; NFC/NFD names alike)."""
    return find_named(features_dir, slide_id, ".h5")


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
    coords_attrs: dict[str, Any] | None = None,
    paths: list[str] | None = None,
) -> Path:
    """Write one slide's features atomically. ``paths``: a patch folder's file of each tile, as
    its coords file recorded them, so that attention maps show the patches that were encoded;
    ``coords_attrs``: the tiling stage's CLAM/TRIDENT attributes (default: from ``patch_size``,
    ``mpp`` and ``level``).
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
    with atomic_h5(path) as h5:
        h5.create_dataset("features", data=features)
        h5.create_dataset("coords", data=coords)
        if coords_attrs is None:
            coords_attrs = coords_dataset_attrs(
                name=path.stem, patch_size=patch_size, level=level, mpp=mpp
            )
        h5["coords"].attrs.update(coords_attrs)
        if paths is not None:
            names = np.array(paths, dtype=object)
            h5.create_dataset("paths", data=names, dtype=h5py.string_dtype())
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
    """Read a feature file written by bidistill, CLAM or TRIDENT."""
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
    check_layout(path, features.shape, features.dtype)
    check_values(path, features)
    if coords is None:
        coords = np.zeros((len(features), 2), dtype=np.int64)
    elif coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    return FeatureFile(features=features, coords=np.asarray(coords, np.int64), attrs=attrs)


def feature_dim(path: str | Path) -> int:
    """D of a feature file, read without loading the features."""
    with h5py.File(path, "r") as h5:
        return int(h5["features"].shape[-1])


# In-memory mode 'auto' keeps features in RAM when they take at most this share of the free memory.
_RAM_SHARE = 0.4


class FeatureStore:
    """slide id → features [n, D] (float32 or float16, as stored).

    Held in RAM when they fit (the fast path on CPU, where reading .h5 files would dominate an
    epoch), otherwise opened lazily, once per process, because h5py handles must not cross into
    data-loader worker processes. Every slide of ``slide_ids`` is checked up front: a missing
    file, or files that disagree on D or on what made them (``identity``), are refused.
    """

    def __init__(
        self,
        features_dir: str | Path,
        slide_ids: Sequence[str],
        *,
        in_memory: Literal["auto", "yes", "no"] = "auto",
        progress: bool = False,
        identity: FeatureIdentity | None = None,
    ):
        """``identity``: the files' common identity when the caller has read it already."""
        self.features_dir = Path(features_dir)
        self.slide_ids = list(dict.fromkeys(slide_ids))
        self._arrays: dict[str, np.ndarray] = {}
        self._handles: dict[str, h5py.File] = {}
        self._pid = os.getpid()
        shapes = self._check_files()
        self.lengths = {slide: shape[0] for slide, shape in shapes.items()}
        dims = {shape[-1] for shape in shapes.values()}
        if len(dims) > 1:
            by_dim = {d: next(s for s, sh in shapes.items() if sh[-1] == d) for d in dims}
            raise FeatureFileError(
                f"{self.features_dir}: feature files have different dimensions "
                f"({', '.join(f'{d} in {s}.h5' for d, s in sorted(by_dim.items()))}); extract "
                "every slide with the same encoder"
            )
        self.dim = dims.pop() if dims else 0
        # What made the files (encoder, weights, patch size, MPP); files that disagree are refused.
        self.identity = identity or common_identity(
            feature_path(self.features_dir, s) for s in self.slide_ids
        )
        n_bytes = sum(int(np.prod(shape)) * 4 for shape in shapes.values())
        if in_memory == "yes" or (
            in_memory == "auto" and n_bytes <= _RAM_SHARE * available_memory_bytes()
        ):
            self._load_all(progress)  # read_feature_file checks the values as it loads
        else:
            self._scan_values()
        log.info(
            "%d feature files, D=%d, %.0f MB, in memory: %s",
            len(self.slide_ids),
            self.dim,
            n_bytes / 2**20,
            self.in_memory,
        )

    @property
    def in_memory(self) -> bool:
        return len(self._arrays) == len(self.slide_ids) and bool(self.slide_ids)

    def _check_files(self) -> dict[str, tuple[int, ...]]:
        missing = [s for s in self.slide_ids if not feature_path(self.features_dir, s).is_file()]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise FeatureFileError(
                f"{self.features_dir}: no feature file for slides {missing[:5]}{more} (expected "
                "<slide_id>.h5; extract them with `bidistill extract`)"
            )
        shapes = {}
        for slide in self.slide_ids:
            path = feature_path(self.features_dir, slide)
            try:
                with h5py.File(path, "r") as h5:
                    shapes[slide] = checked_shape(path, h5["features"])  # features/hygiene.py
            except (OSError, KeyError) as err:
                raise FeatureFileError(f"{path}: not a readable feature file ({err})") from err
        return shapes

    def _scan_values(self) -> None:
        """NaN/inf anywhere fails now, not in the middle of training (one read of each file)."""
        for slide in self.slide_ids:
            path = feature_path(self.features_dir, slide)
            with h5py.File(path, "r") as h5:
                scan_values(path, h5["features"])

    def _load_all(self, progress: bool) -> None:
        slides = self.slide_ids
        if progress:
            from bidistill._progress import transient_track

            slides = transient_track(slides, "loading features")
        for slide in slides:
            self._arrays[slide] = read_feature_file(
                feature_path(self.features_dir, slide), with_coords=False
            ).features

    def get(self, slide_id: str) -> np.ndarray:
        """Features of one slide [n, D]."""
        if slide_id in self._arrays:
            return self._arrays[slide_id]
        if os.getpid() != self._pid:  # a forked worker: never reuse the parent's handles
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(slide_id)
        if handle is None:
            handle = self._handles[slide_id] = h5py.File(
                feature_path(self.features_dir, slide_id), "r"
            )
        features = handle["features"][()]
        return features[0] if features.ndim == 3 else features

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
