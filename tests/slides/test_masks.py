"""Annotation polygons and tissue detection on real images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from bidistill.errors import SlideError
from bidistill.slides.masks import (
    load_annotations,
    otsu_threshold,
    pen_mask,
    rasterize,
    tissue_mask,
)

from .helpers import GREY_BACKGROUND, tissue_image


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def write_bcnb_json(path, positive, negative=()):
    data = {
        "positive": [{"name": f"Annotation {i}", "vertices": v} for i, v in enumerate(positive)],
        "negative": [{"name": f"Cut {i}", "vertices": v} for i, v in enumerate(negative)],
    }
    path.write_text(json.dumps(data))
    return path


def test_bcnb_json_positive_in_negative_out_at_any_level(tmp_path):
    square = [[100, 100], [900, 100], [900, 700], [100, 700]]
    hole = [[300, 300], [500, 300], [500, 500], [300, 500]]
    path = write_bcnb_json(tmp_path / "7.json", [square], [hole])
    ann = load_annotations(path)
    assert len(ann.positive) == 1 and len(ann.negative) == 1 and ann.source == path
    full = rasterize(ann, (800, 1000), (1.0, 1.0))
    assert full[400, 150] and full[650, 850]  # inside
    assert not full[400, 400]  # inside the negative region
    assert not full[50, 50] and not full[750, 950]  # outside
    assert full.sum() == pytest.approx(800 * 600 - 200 * 200, rel=0.01)
    quarter = rasterize(ann, (200, 250), (4.0, 4.0))  # the same polygons at downsample 4
    assert quarter.shape == (200, 250)
    assert quarter.sum() == pytest.approx(full.sum() / 16, rel=0.03)
    assert quarter[100, 40] and not quarter[100, 100]


def test_qupath_geojson_with_hole_multipolygon_and_ignore_class(tmp_path):
    def feature(geometry, cls=None):
        props = {"objectType": "annotation"}
        if cls:
            props["classification"] = {"name": cls, "color": [255, 0, 0]}
        return {"type": "Feature", "geometry": geometry, "properties": props}

    ring = [[0, 0], [400, 0], [400, 400], [0, 400], [0, 0]]
    hole = [[100, 100], [200, 100], [200, 200], [100, 200], [100, 100]]
    other = [[[[600, 0], [800, 0], [800, 200], [600, 200], [600, 0]]]]
    ignore = [[[650, 50], [750, 50], [750, 150], [650, 150], [650, 50]]]
    collection = {
        "type": "FeatureCollection",
        "features": [
            feature({"type": "Polygon", "coordinates": [ring, hole]}, "Tumor"),
            feature({"type": "MultiPolygon", "coordinates": other}),
            feature({"type": "Polygon", "coordinates": ignore}, "Ignore*"),
            feature({"type": "Point", "coordinates": [10, 10]}),
        ],
    }
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps(collection))
    ann = load_annotations(path)
    assert len(ann.positive) == 2 and len(ann.negative) == 2
    mask = rasterize(ann, (400, 800), (1.0, 1.0))
    assert mask[300, 300] and not mask[150, 150]  # hole cut out
    assert mask[20, 620] and not mask[100, 700]  # the Ignore* region cut out
    assert not mask[300, 500]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a JSON annotation file"),
        ('{"positive": [{"name": "a"}]}', r"positive\[0\]: expected an object with 'vertices'"),
        ('{"positive": [{"vertices": [[1, 2], [3, 4]]}]}', "at least 3"),
        ('{"negative": [{"vertices": [[0, 0], [1, 0], [1, 1]]}]}', "no positive"),
        ('{"regions": []}', "expected BCNB JSON"),
    ],
)
def test_bad_annotation_files_name_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SlideError, match=rf"bad\.json: .*{message}"):
        load_annotations(path)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(SlideError, match=r"gone\.json: annotation file not found"):
        load_annotations(tmp_path / "gone.json")


def test_otsu_splits_two_modes():
    values = np.concatenate([np.full(500, 10), np.full(300, 120)])
    assert 10 <= otsu_threshold(values) < 120


@pytest.mark.parametrize("background", [(238, 238, 238), GREY_BACKGROUND])
def test_tissue_mask_covers_tissue_not_background(background):
    rgb, truth = tissue_image(600, 800, seed=2, background=background)
    tissue = tissue_mask(rgb)
    assert _iou(tissue.mask, truth) > 0.95
    assert tissue.mask[~truth].mean() < 0.02


def test_pen_marks_are_not_tissue():
    rgb, truth = tissue_image(600, 800, seed=4, background=GREY_BACKGROUND)
    drawn = np.zeros(truth.shape, dtype=bool)
    # A pathologist's blue outline around empty glass, a green tick and a black scribble.
    drawn[50:56, 20:780] = drawn[540:546, 20:780] = True
    drawn[50:546, 20:26] = drawn[50:546, 774:780] = True
    rgb[drawn] = (40, 70, 170)
    rgb[300:306, 420:520] = (60, 140, 80)
    rgb[20:30, 200:400] = (25, 25, 30)
    ink = drawn.copy()
    ink[300:306, 420:520] = ink[20:30, 200:400] = True
    tissue = tissue_mask(rgb)
    assert tissue.pen[ink].mean() > 0.95
    assert tissue.pen[truth & ~ink].mean() < 0.01  # H&E (with purple nuclei) is not ink
    outside = ~truth & ~ndilate(ink)
    assert tissue.mask[outside].mean() < 0.02
    assert _iou(tissue.mask, truth) > 0.9
    without = tissue_mask(rgb, remove_pen=False)
    assert without.mask[outside].mean() > tissue.mask[outside].mean()


def ndilate(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=8)


def test_pen_mask_leaves_hematoxylin_and_eosin_alone():
    colours = np.array(
        [[[95, 60, 150], [70, 50, 130], [225, 140, 185], [180, 90, 160], [245, 200, 220]]],
        dtype=np.uint8,
    )
    assert not pen_mask(colours).any()


def test_blank_slide_has_no_tissue():
    rng = np.random.default_rng(0)
    rgb = np.clip(rng.normal(230, 3, (400, 500, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask(rgb).mask.sum() == 0


def test_small_specks_are_removed():
    rgb, truth = tissue_image(600, 800, seed=6)
    rgb[10:14, 10:14] = (200, 80, 150)  # a 16-pixel speck of dust, stained
    tissue = tissue_mask(rgb, min_region_fraction=1e-3)
    assert not tissue.mask[10:14, 10:14].any()


def test_dense_dark_nuclei_do_not_turn_their_stroma_into_background():
    """A tumour crowded with hematoxylin-dark nuclei: the stroma between them is tissue too.

    Otsu on the raw saturation split stroma from nuclei here (found on synthetic N+(>2)
    slides, which then kept no tile); the mask must still cover the whole strip.
    """
    rng = np.random.default_rng(0)
    rgb = np.full((300, 400, 3), 232, dtype=np.uint8)  # grey glass
    tissue = np.zeros((300, 400), dtype=bool)
    tissue[83:217, 20:380] = True
    rgb[tissue] = (226, 160, 200)  # pale pink stroma
    seeds = tissue & (rng.random(tissue.shape) < 0.05)
    nuclei = ndimage.binary_dilation(seeds, np.ones((3, 3), dtype=bool)) & tissue
    rgb[nuclei] = (70, 30, 110)  # about a third of the strip
    found = tissue_mask(rgb)
    assert _iou(found.mask, tissue) > 0.97
