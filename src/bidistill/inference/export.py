"""Attention for viewers: per-tile CSV, QuPath-readable GeoJSON, tissue contours as GeoJSON.

GeoJSON as QuPath reads it (File → Import objects, or drag the file onto the slide): a
FeatureCollection whose features carry ``properties.objectType`` (``detection`` for tiles, so
that QuPath's measurement maps colour them by score, ``annotation`` for regions) and
``properties.measurements`` (name → number). Coordinates are level-0 pixels, as QuPath uses
them. The tiles' geometry is their square footprint; the tissue contours are the outlines of
the mask that tiling kept tiles from, traced at the tiling's thumbnail resolution.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bidistill._io import write_csv, write_text
from bidistill.inference.results import SlideAttention

TISSUE_COLOUR = [0, 200, 0]  # QuPath draws an annotation in its classification's colour


def tile_size_level0(attention: SlideAttention, slide_mpp: float | None = None) -> int:
    """A tile's side in level-0 pixels: the file's ``patch_size_level0`` (TRIDENT; bidistill's
    coords files), else its ``patch_size`` at its ``mpp`` scaled to the slide's MPP, else the
    tile grid's spacing (exact for tiles without overlap), else ``patch_size``."""
    attrs = attention.attrs
    if attrs.get("patch_size_level0"):
        return int(attrs["patch_size_level0"])
    patch_size, mpp = attrs.get("patch_size"), attrs.get("mpp")
    if patch_size and mpp and slide_mpp:
        return max(1, round(float(patch_size) * float(mpp) / float(slide_mpp)))
    spacing = _grid_spacing(attention.coords)
    if spacing:
        return spacing
    return int(patch_size or 256)


def _grid_spacing(coords: np.ndarray) -> int | None:
    steps = []
    for axis in (0, 1):
        values = np.unique(coords[:, axis])
        if len(values) > 1:
            steps.append(int(np.diff(values).min()))
    return min(steps) if steps else None


def write_tiles_csv(path: str | Path, attention: SlideAttention, tile_size: int) -> Path:
    """One row per tile: index, level-0 box and every branch's score and percentile."""
    frame = attention.frame()
    frame.insert(3, "size", tile_size)
    write_csv(path, frame)
    return Path(path)


def tiles_geojson(attention: SlideAttention, tile_size: int) -> dict[str, Any]:
    """The tiles as QuPath detections, each with its scores as measurements."""
    frame = attention.frame()
    measure = [c for c in frame.columns if c.startswith((attention.column, "percentile"))]
    values = frame[measure].to_numpy(np.float64)
    features = []
    for tile, x, y, scores in zip(frame["tile"], frame["x"], frame["y"], values):
        x, y = int(x), int(y)
        ring = [[x, y], [x + tile_size, y], [x + tile_size, y + tile_size], [x, y + tile_size]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring + [ring[0]]]},
                "properties": {
                    "objectType": "detection",
                    "name": f"tile {int(tile)}",
                    "measurements": dict(zip(measure, scores.tolist())),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def contours_geojson(
    mask: np.ndarray,
    downsample: tuple[float, float],
    *,
    name: str = "Tissue",
) -> dict[str, Any]:
    """The outlines of a thumbnail mask (``downsample``: level-0 pixels per mask pixel) as
    QuPath annotations classified ``name``: one Polygon with its holes per connected region."""
    from contourpy import FillType, contour_generator

    # Pad with background so that regions touching the border close; the 0.5 level runs along
    # pixel edges' midpoints, i.e. the outline of the mask pixels' centres.
    padded = np.pad(mask.astype(np.float64), 1)
    generator = contour_generator(z=padded, fill_type=FillType.OuterOffset)
    points, offsets = generator.filled(0.5, 2.0)
    dx, dy = downsample
    features = []
    for polygon_points, polygon_offsets in zip(points, offsets):
        rings = []
        for start, stop in zip(polygon_offsets[:-1], polygon_offsets[1:]):
            ring = polygon_points[start:stop]
            # padded index → thumbnail pixel centre → level 0
            xs = (ring[:, 0] - 1 + 0.5) * dx
            ys = (ring[:, 1] - 1 + 0.5) * dy
            coords = np.round(np.stack([xs, ys], axis=1), 1).tolist()
            if coords[0] != coords[-1]:
                coords.append(coords[0])
            if len(coords) >= 4:
                rings.append(coords)
        if rings:
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": rings},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": name, "color": TISSUE_COLOUR},
                    },
                }
            )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, collection: dict[str, Any]) -> Path:
    write_text(path, json.dumps(collection, separators=(",", ":")) + "\n")
    return Path(path)
