"""Tiling one slide: a grid of square tiles, kept where the mask is and the tile is not blank.

The tile side is ``patch_size`` pixels at the target MPP (or level 0 when it is null). Masks and
the blank filter are evaluated on a thumbnail with about 16 pixels per tile side, with a
summed-area table, so a slide of a million candidate tiles is filtered in milliseconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bidistill.config import MaskKind, TilingConfig
from bidistill.errors import SlideError
from bidistill.slides.coords import write_coords
from bidistill.slides.masks import ink_strokes, load_annotations, rasterize, tissue_mask
from bidistill.slides.reader import PatchFolder, Slide, WholeSlide, require_mpp

log = logging.getLogger(__name__)

THUMB_PX_PER_TILE = 16
THUMB_SIDE = (1024, 4096)  # bounds on the thumbnail's longest side
# With `remove_pen`, a tile with blue or green marker on more than this share of it is dropped,
# whatever the mask: an annotation polygon is often drawn right along the pathologist's ink, and
# ink over tissue changes what an encoder sees. On synthetic BCNB slides a stroke across a tile
# covers 2-8% of it (its tinted rim included, see ink_strokes); on a real H&E slide without
# marker (CMU-1-Small-Region) no tile has any.
MAX_PEN_FRACTION = 0.01


@dataclass(frozen=True)
class TileSpec:
    """Tile geometry of one slide: ``patch_size`` and ``overlap`` at the target ``mpp`` (None:
    level 0 of a slide whose MPP is unknown), size and stride in level-0 pixels."""

    patch_size: int
    size_level0: int
    stride_level0: int
    level: int
    mpp: float | None
    overlap: int = 0


@dataclass
class SlideTiling:
    """The outcome of tiling one slide: what is written, plus what the QC image shows (masks at
    thumbnail resolution, ``downsample`` level-0 pixels per thumbnail pixel; ``pen`` the marker
    strokes that tiles were dropped for, None when ``remove_pen`` is off)."""

    coords: np.ndarray
    spec: TileSpec
    mask_kind: str
    thumbnail: np.ndarray
    mask: np.ndarray
    downsample: tuple[float, float]
    n_candidates: int
    pen: np.ndarray | None = None


def tile_spec(slide: WholeSlide, tiling: TilingConfig) -> TileSpec:
    """Tile geometry for ``slide``: sizes in level-0 pixels and the level to read from."""
    if tiling.mpp is None:
        scale = 1.0
        target_mpp = slide.mpp
    else:
        scale = tiling.mpp / require_mpp(slide)
        target_mpp = tiling.mpp
    size_level0 = max(1, round(tiling.patch_size * scale))
    stride_level0 = max(1, round((tiling.patch_size - tiling.overlap) * scale))
    return TileSpec(
        patch_size=tiling.patch_size,
        size_level0=size_level0,
        stride_level0=stride_level0,
        level=slide.best_level(size_level0 / tiling.patch_size),
        mpp=target_mpp,
        overlap=tiling.overlap,
    )


def grid_coords(width: int, height: int, size: int, stride: int) -> np.ndarray:
    """Top-left corners of every whole ``size`` tile on a ``stride`` grid; int64 [n, 2] (x, y)."""
    xs = np.arange(0, width - size + 1, stride, dtype=np.int64)
    ys = np.arange(0, height - size + 1, stride, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)  # row-major: tiles run left to right, then top to bottom
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def box_fractions(
    mask: np.ndarray, coords: np.ndarray, size_level0: int, downsample: tuple[float, float]
) -> np.ndarray:
    """Share of each tile covered by ``mask`` (bool, ``downsample`` level-0 pixels per mask
    pixel), from a summed-area table."""
    h, w = mask.shape
    table = np.zeros((h + 1, w + 1), dtype=np.int64)
    table[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    dx, dy = downsample
    x0 = np.clip(np.floor(coords[:, 0] / dx), 0, w).astype(np.int64)
    y0 = np.clip(np.floor(coords[:, 1] / dy), 0, h).astype(np.int64)
    x1 = np.clip(np.ceil((coords[:, 0] + size_level0) / dx), 0, w).astype(np.int64)
    y1 = np.clip(np.ceil((coords[:, 1] + size_level0) / dy), 0, h).astype(np.int64)
    x1 = np.maximum(x1, np.minimum(x0 + 1, w))
    y1 = np.maximum(y1, np.minimum(y0 + 1, h))
    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return inside / area


def thumbnail_downsample(width: int, height: int, size_level0: int) -> float:
    """About 16 thumbnail pixels per tile side, with the longest side kept in [1024, 4096]."""
    longest = max(width, height)
    ds = size_level0 / THUMB_PX_PER_TILE
    ds = min(max(ds, longest / THUMB_SIDE[1]), max(longest / THUMB_SIDE[0], 1.0))
    return max(ds, 1.0)


def slide_mask(
    slide: WholeSlide,
    tiling: TilingConfig,
    thumbnail: np.ndarray,
    downsample: tuple[float, float],
    annotations_path: Path | None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """The inclusion mask, the per-pixel tissue map of a thumbnail and the mask kind used."""
    tissue = tissue_mask(
        thumbnail, min_region_fraction=tiling.min_region_fraction, remove_pen=tiling.remove_pen
    )
    kind = tiling.mask
    if kind == MaskKind.auto:
        kind = MaskKind.annotations if annotations_path is not None else MaskKind.tissue
    if kind == MaskKind.annotations:
        if annotations_path is None:
            raise SlideError(
                f"{slide.path}: `tiling.mask: annotations` but the slide has no annotation file "
                "(set `slides.annotations_dir` to a folder of <slide_id>.json or .geojson)"
            )
        mask = rasterize(load_annotations(annotations_path), thumbnail.shape[:2], downsample)
    elif kind == MaskKind.tissue:
        mask = tissue.mask
    else:
        mask = np.ones(thumbnail.shape[:2], dtype=bool)
    return mask, tissue.foreground, str(kind)


def tile_slide(
    slide: WholeSlide, tiling: TilingConfig, *, annotations_path: Path | None = None
) -> SlideTiling:
    """Tile a whole-slide image: grid, mask, blank filter.

    A tile is kept when at least ``min_mask_fraction`` of it lies in the mask, at most
    ``max_blank_fraction`` of it is background (not tissue, pen ink counted as background) and,
    with ``remove_pen``, at most ``MAX_PEN_FRACTION`` of it is blue or green marker (whatever
    the mask).
    """
    spec = tile_spec(slide, tiling)
    ds = thumbnail_downsample(slide.width, slide.height, spec.size_level0)
    thumbnail, downsample = slide.thumbnail(ds)
    mask, foreground, kind = slide_mask(slide, tiling, thumbnail, downsample, annotations_path)
    candidates = grid_coords(slide.width, slide.height, spec.size_level0, spec.stride_level0)
    in_mask = box_fractions(mask, candidates, spec.size_level0, downsample)
    blank = 1.0 - box_fractions(foreground, candidates, spec.size_level0, downsample)
    keep = (in_mask >= max(tiling.min_mask_fraction, 1e-9)) & (blank <= tiling.max_blank_fraction)
    pen = ink_strokes(thumbnail) if tiling.remove_pen else None
    if pen is not None:
        keep &= box_fractions(pen, candidates, spec.size_level0, downsample) <= MAX_PEN_FRACTION
    return SlideTiling(
        coords=candidates[keep],
        spec=spec,
        mask_kind=kind,
        thumbnail=thumbnail,
        mask=mask,
        downsample=downsample,
        n_candidates=len(candidates),
        pen=pen,
    )


def write_slide_tiling(
    path: Path, slide: Slide, tiling: SlideTiling, *, signature: dict[str, object] | None = None
) -> Path:
    """Write a whole slide's tiling to its coords file (atomically), with the slide's
    ``signature`` (``slide_signature``: which version of the file was tiled)."""
    return write_coords(
        path,
        tiling.coords,
        patch_size=tiling.spec.patch_size,
        patch_size_level0=tiling.spec.size_level0,
        level=tiling.spec.level,
        mpp=tiling.spec.mpp,
        slide_mpp=slide.mpp,
        mask_kind=tiling.mask_kind,
        width=slide.width,
        height=slide.height,
        overlap=tiling.spec.overlap,
        extra_attrs={
            "stride_level0": tiling.spec.stride_level0,
            "source": str(slide.path),
            **(signature or {}),
        },
    )


def write_patch_folder_coords(
    path: Path,
    folder: PatchFolder,
    tiling: TilingConfig,
    *,
    signature: dict[str, object] | None = None,
) -> Path:
    """A patch folder's 'tiling': every file is a tile, at synthetic coords (i, 0); tile i is
    the file named ``paths[i]`` (readers open it by that name)."""
    n = len(folder.patch_paths)
    coords = np.stack([np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64)], axis=1)
    return write_coords(
        path,
        coords,
        patch_size=tiling.patch_size,
        patch_size_level0=folder.patch_width,
        level=0,
        mpp=tiling.mpp if tiling.mpp is not None else folder.mpp,
        slide_mpp=folder.mpp,
        mask_kind="patches",
        width=folder.width,
        height=folder.height,
        paths=[p.name for p in folder.patch_paths],
        extra_attrs={"source": str(folder.path), **(signature or {})},
    )
