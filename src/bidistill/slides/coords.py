"""The tile-coordinates file ``<coords_dir>/<slide_id>.h5``, the tiling stage's output (layout:
docs/internal-interfaces.md). Its ``coords`` dataset carries CLAM's and TRIDENT's attributes, so
their tools read these files as their own. Written atomically: a file that exists is whole,
which is what lets a killed tiling run resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bidistill import __version__
from bidistill._io import atomic_h5, h5_attrs
from bidistill._paths import find_named
from bidistill.errors import BidistillError
from bidistill.features.interop import coords_dataset_attrs

REQUIRED_ATTRS = ("patch_size", "patch_size_level0", "level", "mpp", "mask_kind", "width", "height")


class CoordsFileError(BidistillError, ValueError):
    """A coords file that breaks the contract; the message names the file."""


@dataclass
class CoordsFile:
    coords: np.ndarray  # [n, 2] int64, level-0 x, y (patch folders: i, 0)
    attrs: dict[str, Any] = field(default_factory=dict)
    paths: list[str] | None = None  # patch folders: file name of each tile

    @property
    def patch_size(self) -> int:
        return int(self.attrs["patch_size"])

    @property
    def patch_size_level0(self) -> int:
        return int(self.attrs["patch_size_level0"])

    def tool_attrs(self, name: str) -> dict[str, Any]:
        """The ``coords`` dataset attributes of CLAM and TRIDENT for these tiles (for a feature
        file made from them; files tiled before they were written get them too)."""
        a = self.attrs
        return coords_dataset_attrs(
            name=name,
            patch_size=self.patch_size,
            level=int(a["level"]),
            mpp=a.get("mpp"),
            patch_size_level0=self.patch_size_level0,
            slide_mpp=a.get("slide_mpp"),
            overlap=a.get("overlap"),
            width=int(a["width"]),
            height=int(a["height"]),
        )


def coords_path(coords_dir: str | Path, slide_id: str) -> Path:
    """``<coords_dir>/<slide_id>.h5`` (kept inside ``coords_dir``; NFC/NFD names alike)."""
    return find_named(coords_dir, slide_id, ".h5")


def nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def write_coords(
    path: str | Path,
    coords: np.ndarray,
    *,
    patch_size: int,
    patch_size_level0: int,
    level: int,
    mpp: float | None,
    slide_mpp: float | None,
    mask_kind: str,
    width: int,
    height: int,
    overlap: int = 0,
    paths: list[str] | None = None,
    extra_attrs: dict[str, Any] | None = None,
) -> Path:
    """Write one slide's tile coordinates atomically."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if paths is not None and len(paths) != len(coords):
        raise CoordsFileError(f"{path}: {len(paths)} paths for {len(coords)} coords")
    path = Path(path)
    with atomic_h5(path) as h5:
        h5.create_dataset("coords", data=coords)
        if paths is not None:
            names = np.array(paths, dtype=object)
            h5.create_dataset("paths", data=names, dtype=h5py.string_dtype())
        attrs = {
            "patch_size": int(patch_size),
            "patch_size_level0": int(patch_size_level0),
            "level": int(level),
            "mpp": nan_if_none(mpp),
            "slide_mpp": nan_if_none(slide_mpp),
            "mask_kind": str(mask_kind),
            "width": int(width),
            "height": int(height),
            "overlap": int(overlap),
            "bidistill_version": __version__,
            **(extra_attrs or {}),
        }
        h5.attrs.update(attrs)
        h5["coords"].attrs.update(CoordsFile(coords, attrs).tool_attrs(path.stem))
    return path


def read_coords(path: str | Path) -> CoordsFile:
    """Read a coords file (ours; CLAM's coords files also load when they carry these attrs)."""
    path = Path(path)
    if not path.is_file():
        raise CoordsFileError(f"{path}: coords file not found (make it with `bidistill tile`)")
    try:
        with h5py.File(path, "r") as h5:
            if "coords" not in h5:
                raise CoordsFileError(f"{path}: no 'coords' dataset (remake with `bidistill tile`)")
            coords = np.asarray(h5["coords"][()], dtype=np.int64)
            attrs = h5_attrs(h5)
            paths = _tile_names(h5)
    except OSError as err:
        raise CoordsFileError(f"{path}: not a readable HDF5 file ({err})") from err
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise CoordsFileError(f"{path}: 'coords' must be [n, 2], got {coords.shape}")
    missing = [a for a in REQUIRED_ATTRS if a not in attrs]
    if missing:
        raise CoordsFileError(
            f"{path}: missing attributes {missing} (remake it with `bidistill tile`)"
        )
    for key in ("mpp", "slide_mpp"):
        if key in attrs and isinstance(attrs[key], float) and math.isnan(attrs[key]):
            attrs[key] = None
    return CoordsFile(coords=coords, attrs=attrs, paths=paths)


def read_tile_names(path: str | Path) -> list[str] | None:
    """A patch folder's file of each tile, as a coords file (or a feature file extracted from
    one) recorded them; None when the file records none (a whole slide, or an older file)."""
    try:
        with h5py.File(path, "r") as h5:
            return _tile_names(h5)
    except OSError:
        return None


def _tile_names(h5: h5py.File) -> list[str] | None:
    if "paths" not in h5:
        return None
    return [p.decode() if isinstance(p, bytes) else str(p) for p in h5["paths"][()]]
