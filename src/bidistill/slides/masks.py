"""Where the tiles may come from: annotation polygons, or detected tissue, on a thumbnail.

Tissue is Otsu on HSV saturation (scanner background has almost none), after removing pen marks
(BCNB slides carry blue outlines drawn by pathologists), then morphological clean-up.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from bidistill.errors import SlideError

NEGATIVE_CLASSES = {"negative", "ignore", "ignore*", "exclude", "excluded", "background"}
MIN_SATURATION = 15  # floor of the Otsu threshold (0-255): a blank slide must not become tissue


@dataclass
class Annotations:
    """Polygons (float [n_vertices, 2] of level-0 x, y): ``positive`` in, ``negative`` out."""

    positive: list[np.ndarray] = field(default_factory=list)
    negative: list[np.ndarray] = field(default_factory=list)
    source: Path | None = None


def load_annotations(path: str | Path) -> Annotations:
    """Read BCNB JSON (``{"positive": [{"vertices": [[x, y], ...]}], "negative": [...]}``) or
    GeoJSON as QuPath exports it (holes and ``Ignore``/``Negative`` objects are out; geometries
    other than polygons are ignored)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SlideError(f"{path}: annotation file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SlideError(f"{path}: not a JSON annotation file ({err})") from err
    if isinstance(data, dict) and ("positive" in data or "negative" in data):
        annotations = _bcnb_annotations(data, path)
    else:
        annotations = _geojson_annotations(data, path)
    annotations.source = path
    if not annotations.positive:
        raise SlideError(f"{path}: no positive (inclusion) polygon in the annotation file")
    return annotations


def _polygon(vertices: object, path: Path, where: str) -> np.ndarray:
    try:
        poly = np.asarray(vertices, dtype=np.float64)
    except (TypeError, ValueError):
        poly = np.empty((0,))
    if poly.ndim != 2 or poly.shape[1] != 2 or len(poly) < 3:
        raise SlideError(f"{path}: {where}: expected a list of at least 3 [x, y] vertices")
    return poly


def _bcnb_annotations(data: dict, path: Path) -> Annotations:
    out = Annotations()
    for key, polygons in (("positive", out.positive), ("negative", out.negative)):
        regions = data.get(key) or []
        if not isinstance(regions, list):
            raise SlideError(f"{path}: '{key}' must be a list of regions")
        for i, region in enumerate(regions):
            if not isinstance(region, dict) or "vertices" not in region:
                raise SlideError(f"{path}: {key}[{i}]: expected an object with 'vertices'")
            polygons.append(_polygon(region["vertices"], path, f"{key}[{i}].vertices"))
    return out


def _geojson_annotations(data: object, path: Path) -> Annotations:
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and "coordinates" in data:
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    elif isinstance(data, list):
        features = data
    else:
        raise SlideError(
            f"{path}: expected BCNB JSON ({{'positive': [...], 'negative': [...]}}) or GeoJSON "
            "(a FeatureCollection, Feature or list of Features)"
        )
    out = Annotations()
    for i, feature in enumerate(features):
        geometry = (feature or {}).get("geometry") if isinstance(feature, dict) else None
        if not isinstance(geometry, dict):
            raise SlideError(f"{path}: feature {i}: expected a GeoJSON Feature with a geometry")
        negative = _is_negative(feature.get("properties") or {})
        kind = geometry.get("type")
        coordinates = geometry.get("coordinates") or []
        polygons = {"Polygon": [coordinates], "MultiPolygon": coordinates}.get(kind, [])
        for j, rings in enumerate(polygons):
            if not rings:
                continue
            where = f"feature {i} polygon {j}"
            outer = _polygon(rings[0], path, where)
            holes = [_polygon(r, path, f"{where} hole") for r in rings[1:]]
            if negative:
                out.negative.append(outer)
            else:
                out.positive.append(outer)
                out.negative.extend(holes)
    return out


def _is_negative(properties: dict) -> bool:
    """QuPath puts the class in ``classification.name``; older exports use a plain string."""
    cls = properties.get("classification")
    name = cls.get("name") if isinstance(cls, dict) else cls
    return isinstance(name, str) and name.strip().lower() in NEGATIVE_CLASSES


def rasterize(
    annotations: Annotations, shape: tuple[int, int], downsample: tuple[float, float]
) -> np.ndarray:
    """bool [height, width]: positive regions filled, negative regions cut out, at
    ``downsample`` (dx, dy) level-0 pixels per mask pixel."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    scale = np.array(downsample, dtype=np.float64)
    for value, polygons in ((1, annotations.positive), (0, annotations.negative)):
        for poly in polygons:
            points = [tuple(p) for p in (poly / scale).tolist()]
            draw.polygon(points, fill=value, outline=value)
    return np.asarray(canvas, dtype=bool)


@dataclass
class TissueMask:
    """Tissue detection on a thumbnail: ``mask`` the cleaned regions, ``foreground`` the
    pixels that are tissue one by one (the blank filter counts the others as background)."""

    mask: np.ndarray
    foreground: np.ndarray
    pen: np.ndarray
    threshold: float


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation scaled to 0-255, uint8 [h, w] (integer arithmetic: this runs on
    millions of thumbnail pixels)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hi = np.maximum(np.maximum(r, g), b)
    lo = np.minimum(np.minimum(r, g), b)
    spread = (hi - lo).astype(np.uint16) * 255
    return (spread // np.maximum(hi, 1)).astype(np.uint8)


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of blue, green or black marker ink.

    H&E is pink to purple: red is at least as strong as green, and blue exceeds red only in
    purple hematoxylin (green below red). Blue ink has blue well above both and green above red;
    green ink has green above both; black ink is dark and grey.
    """
    return np.logical_or.reduce(_inks(rgb))


def _inks(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    blue = (b - np.maximum(r, g) > 40) & (g > r)
    green = g - np.maximum(r, b) > 20
    hi = np.maximum(np.maximum(r, g), b)
    lo = np.minimum(np.minimum(r, g), b)
    black = (hi < 60) & (hi - lo < 30)
    return blue, green, black


def ink_strokes(rgb: np.ndarray, *, min_region_fraction: float = 2e-5) -> np.ndarray:
    """Strokes of blue or green marker: the ink that tiles are dropped for.

    Black is left out, and so are specks: dense hematoxylin passes the black-ink colour test
    pixel by pixel (on a real H&E slide about 0.3% of the pixels), but never as a stroke of
    blue or green. The strokes are widened by two pixels, as in ``tissue_mask``, because their
    anti-aliased rims are tinted too.
    """
    blue, green, _ = _inks(rgb)
    strokes = remove_small_regions(
        blue | green, max(16, round(rgb.shape[0] * rgb.shape[1] * min_region_fraction))
    )
    return ndimage.maximum_filter(strokes.view(np.uint8), size=5).view(bool)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of 0-255 values (a 1-D array): maximises between-class variance."""
    hist = np.bincount(np.clip(values, 0, 255).astype(np.uint8).ravel(), minlength=256)
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return float(MIN_SATURATION)
    levels = np.arange(256, dtype=np.float64)
    weight0 = np.cumsum(hist)
    weight1 = total - weight0
    mean0 = np.cumsum(hist * levels) / np.maximum(weight0, 1)
    mean1 = (np.sum(hist * levels) - np.cumsum(hist * levels)) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(np.argmax(between))


def tissue_mask(
    rgb: np.ndarray, *, min_region_fraction: float = 5e-4, remove_pen: bool = True
) -> TissueMask:
    """Detect tissue on a thumbnail; regions under ``min_region_fraction`` of it are dust."""
    sat = saturation(rgb)
    pen = np.zeros(rgb.shape[:2], dtype=bool)
    if remove_pen:
        # Widen the strokes by two pixels: their anti-aliased rims are tinted too.
        pen = ndimage.maximum_filter(pen_mask(rgb).view(np.uint8), size=5).view(bool)
    # Otsu on a smoothed copy: where dark nuclei cover much of a tumour, the raw histogram's
    # split falls between stroma and nuclei and the stroma is lost as background; averaging
    # over ~8 px mixes nuclei with their stroma, so the split falls between tissue and glass.
    smoothed = ndimage.uniform_filter(sat.astype(np.float32), size=8)
    candidates = smoothed[~pen]
    threshold = max(otsu_threshold(candidates), MIN_SATURATION) if candidates.size else 255.0
    foreground = (sat > threshold) & ~pen
    # Clean-up works on at most ~1.5 Mpx (a coarser grid for big thumbnails) to stay fast.
    factor = max(1, math.ceil(math.sqrt(foreground.size / 1.5e6)))
    coarse = _shrink(foreground, factor)
    structure = np.ones((3, 3), dtype=bool)
    mask = ndimage.binary_closing(coarse, structure, iterations=2)
    mask = ndimage.binary_opening(mask, structure, iterations=1)
    mask = ndimage.binary_fill_holes(mask)
    mask = remove_small_regions(mask, max(1, round(min_region_fraction * mask.size)))
    mask = _grow(mask, factor, foreground.shape)
    return TissueMask(mask=mask, foreground=foreground, pen=pen, threshold=float(threshold))


def _shrink(mask: np.ndarray, factor: int) -> np.ndarray:
    """Block majority over ``factor`` x ``factor`` blocks (edges padded with False)."""
    if factor == 1:
        return mask
    h, w = mask.shape
    ph, pw = -h % factor, -w % factor
    padded = np.pad(mask, ((0, ph), (0, pw)))
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor)
    return blocks.sum((1, 3), dtype=np.int32) * 2 >= factor * factor


def _grow(mask: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a ``_shrink``-ed mask back to ``shape``."""
    if factor == 1:
        return mask
    big = np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)
    return big[: shape[0], : shape[1]]


def remove_small_regions(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Keep the 8-connected regions of ``mask`` with at least ``min_pixels`` pixels."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]
