"""Feature hygiene: what a feature file must satisfy before anything trains or predicts on it.

A damaged header can declare 1e11 rows, and NaN or infinite values would turn a loss, an AUC or a
prediction into NaN: such a file fails when a store opens it, with a message that names it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bidistill.errors import FeatureFileError

# A slide's features are read whole; a slide that needs more than this share of the available
# memory (as float32) cannot be used, and is far beyond any real slide (1e6 tiles x 1536-d
# features take 6 GB).
MEMORY_SHARE = 0.5
# Bytes read at a time when a file is scanned for NaN/inf without loading it.
SCAN_BYTES = 64 * 2**20


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo; a conservative 4 GiB where that file does not exist."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def checked_shape(path: str | Path, dataset) -> tuple[int, int]:
    """``[n, D]`` of a ``features`` dataset (h5py or numpy), checked without reading values:
    rank, floating point, instances, and size against this machine's memory."""
    shape = tuple(int(s) for s in dataset.shape)
    if len(shape) == 3 and shape[0] == 1:  # CLAM's older [1, n, D] layout
        shape = shape[1:]
    check_layout(path, shape, np.dtype(dataset.dtype))
    available = available_memory_bytes()
    needed = shape[0] * shape[1] * 4
    if needed > MEMORY_SHARE * available:
        raise FeatureFileError(
            f"{path}: declares {shape[0]:,} x {shape[1]} features ({format_bytes(needed)} as "
            f"float32), more than half of the {format_bytes(available)} of memory available; "
            "the file is damaged, or the slide must be tiled coarser"
        )
    return shape[0], shape[1]


def check_layout(path: str | Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Rank 2, floating point, at least one instance and one dimension."""
    if len(shape) <= 2 and shape and shape[0] == 0:
        # TRIDENT writes a slide without tissue as features of shape (0,) or (0, D): not a
        # damaged file, a slide with nothing to learn from.
        raise FeatureFileError(
            f"{path}: no tiles in this slide (features of shape {shape}, no instances): drop it "
            "from the cohort table, or tile it again if it has tissue (see its QC image)"
        )
    if len(shape) != 2:
        hint = (
            " (a 1-D array is one number per instance or a single vector, not one embedding per "
            "tile)"
            if len(shape) == 1
            else ""
        )
        raise FeatureFileError(
            f"{path}: 'features' must be a 2-D array [n instances, D], got shape {shape}{hint}; "
            "re-extract the slide with `bidistill extract`"
        )
    if dtype.kind != "f":
        raise FeatureFileError(
            f"{path}: 'features' hold {dtype} values, but feature files hold float32 or float16 "
            "embeddings; integers are not patch features (check what wrote this file)"
        )
    n, dim = shape
    if dim == 0:
        raise FeatureFileError(f"{path}: 'features' have 0 values per instance ({n} x 0)")


def check_values(path: str | Path, features: np.ndarray, first_row: int = 0) -> None:
    """Refuse NaN and infinite values, naming the first instance (row) that holds one."""
    finite = np.isfinite(features)
    if finite.all():
        return
    bad_rows = np.flatnonzero(~finite.all(axis=-1))
    raise FeatureFileError(
        f"{path}: 'features' hold NaN or infinite values ({int((~finite).sum()):,} values in "
        f"{len(bad_rows):,} instances, the first at row {first_row + int(bad_rows[0])}); "
        "extract the slide again"
    )


def scan_values(path: str | Path, dataset) -> None:
    """``check_values`` over an h5py ``features`` dataset, read a block of rows at a time."""
    n = dataset.shape[-2]
    row_bytes = max(1, dataset.shape[-1] * dataset.dtype.itemsize)
    step = max(1, SCAN_BYTES // row_bytes)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        block = dataset[rows] if dataset.ndim == 2 else dataset[0, rows]  # CLAM's [1, n, D]
        check_values(path, block, first_row=start)
