"""Tiling one slide: geometry, masks, the blank filter, and the coords file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath

from bidistill.config import TilingConfig
from bidistill.errors import SlideError
from bidistill.slides import CoordsFileError, open_slide, read_coords, tile_slide
from bidistill.slides.tiling import (
    box_fractions,
    grid_coords,
    tile_spec,
    write_slide_tiling,
)

from .helpers import CMU_SVS, needs_cmu, write_pyramid_tiff


def test_grid_coords_are_whole_tiles_row_major():
    coords = grid_coords(1000, 600, 256, 256)
    assert coords.dtype == np.int64 and coords.shape == (3 * 2, 2)
    assert coords[:4].tolist() == [[0, 0], [256, 0], [512, 0], [0, 256]]
    assert (coords + 256 <= [1000, 600]).all()
    assert len(grid_coords(1000, 600, 256, 128)) == 6 * 3  # 50% overlap
    assert len(grid_coords(100, 600, 256, 256)) == 0


def test_box_fractions_match_a_direct_count():
    rng = np.random.default_rng(0)
    mask = rng.random((50, 70)) < 0.4
    coords = np.array([[0, 0], [40, 80], [300, 200], [690, 490]])
    got = box_fractions(mask, coords, 40, (10.0, 10.0))
    want = [mask[y // 10 : y // 10 + 4, x // 10 : x // 10 + 4].mean() for x, y in coords[:3]]
    np.testing.assert_allclose(got[:3], want)
    assert got[3] == mask[49, 69]  # a tile at the edge counts the pixels that exist


def test_tile_spec_at_target_mpp_reads_from_the_matching_level(pyramid_tiff):
    with open_slide(pyramid_tiff) as slide:  # 0.25 um/px, levels 1, 2, 4
        spec = tile_spec(slide, TilingConfig(patch_size=256, mpp=0.5))
        assert (spec.size_level0, spec.stride_level0, spec.level) == (512, 512, 1)
        spec = tile_spec(slide, TilingConfig(patch_size=256, mpp=0.5, overlap=64))
        assert spec.stride_level0 == 384
        spec = tile_spec(slide, TilingConfig(patch_size=128, mpp=None))
        assert (spec.size_level0, spec.level, spec.mpp) == (128, 0, 0.25)


def test_target_mpp_needs_the_slide_mpp(tmp_path, tissue_rgb):
    path = write_pyramid_tiff(tmp_path / "nompp.tif", tissue_rgb[0], mpp=None, levels=1)
    with open_slide(path) as slide:
        with pytest.raises(SlideError, match=r"nompp\.tif: .*no microns-per-pixel.*slides\.mpp"):
            tile_slide(slide, TilingConfig())
        result = tile_slide(slide, TilingConfig(mpp=None))  # level 0 needs no MPP
    assert len(result.coords) > 0 and result.spec.mpp is None


def test_tissue_tiles_lie_on_tissue(pyramid_tiff, tissue_rgb):
    _, truth = tissue_rgb
    with open_slide(pyramid_tiff) as slide:
        result = tile_slide(slide, TilingConfig(patch_size=64, mpp=0.5))
    assert result.mask_kind == "tissue"
    side = result.spec.size_level0
    assert side == 128
    assert len(result.coords) > 20
    for x, y in result.coords:
        assert truth[y : y + side, x : x + side].mean() >= 0.6
    # and most of the tissue is covered
    covered = np.zeros_like(truth)
    for x, y in result.coords:
        covered[y : y + side, x : x + side] = True
    assert (covered & truth).sum() / truth.sum() > 0.6


def _polygon_json(path, vertices):
    path.write_text(json.dumps({"positive": [{"name": "tumour", "vertices": vertices}]}))
    return path


def test_tiles_inside_polygons_only(pyramid_tiff, tmp_path):
    triangle = [[200, 100], [1500, 300], [500, 1100]]
    ann = _polygon_json(tmp_path / "pyr.json", triangle)
    cfg = TilingConfig(patch_size=32, mpp=0.5, min_mask_fraction=1.0, max_blank_fraction=1.0)
    with open_slide(pyramid_tiff) as slide:
        result = tile_slide(slide, cfg, annotations_path=ann)
    assert result.mask_kind == "annotations"
    assert len(result.coords) > 50
    poly = PolygonPath(np.array(triangle, dtype=float))
    side = result.spec.size_level0
    corners = np.concatenate(
        [result.coords + [dx, dy] for dx in (1, side - 1) for dy in (1, side - 1)]
    )
    # Within one thumbnail pixel of the polygon (the mask is rasterised on the thumbnail).
    assert poly.contains_points(corners, radius=2 * 1.6).all()


def test_blank_filter_drops_tiles_over_empty_glass(pyramid_tiff, tissue_rgb, tmp_path):
    _, truth = tissue_rgb
    whole = [[0, 0], [1600, 0], [1600, 1200], [0, 1200]]  # an annotation over everything
    ann = _polygon_json(tmp_path / "all.json", whole)
    strict = TilingConfig(patch_size=64, mpp=0.5, max_blank_fraction=0.3)
    loose = TilingConfig(patch_size=64, mpp=0.5, max_blank_fraction=1.0)
    with open_slide(pyramid_tiff) as slide:
        kept = tile_slide(slide, strict, annotations_path=ann)
        everything = tile_slide(slide, loose, annotations_path=ann)
    assert len(everything.coords) == everything.n_candidates == 12 * 9
    assert 10 < len(kept.coords) < len(everything.coords)
    side = kept.spec.size_level0
    blank = [1 - truth[y : y + side, x : x + side].mean() for x, y in kept.coords]
    assert max(blank) <= 0.35  # measured on the thumbnail: within a few pixels of 0.3


def test_annotations_mask_without_a_file_is_an_error(pyramid_tiff):
    with (
        open_slide(pyramid_tiff) as slide,
        pytest.raises(SlideError, match=r"pyr\.tif: `tiling.mask: annotations`"),
    ):
        tile_slide(slide, TilingConfig(mask="annotations"))


def test_coords_file_round_trip(pyramid_tiff, tmp_path):
    with open_slide(pyramid_tiff) as slide:
        result = tile_slide(slide, TilingConfig(patch_size=64, mpp=0.5))
        path = write_slide_tiling(tmp_path / "coords" / "pyr.h5", slide, result)
    got = read_coords(path)
    np.testing.assert_array_equal(got.coords, result.coords)
    assert got.coords.dtype == np.int64
    assert got.attrs["patch_size"] == 64 and got.patch_size_level0 == 128
    assert got.attrs["level"] == 1 and got.attrs["mpp"] == 0.5 and got.attrs["slide_mpp"] == 0.25
    assert got.attrs["mask_kind"] == "tissue"
    assert (got.attrs["width"], got.attrs["height"]) == (1600, 1200)
    assert got.attrs["bidistill_version"] and got.paths is None
    assert [p.name for p in path.parent.iterdir()] == ["pyr.h5"]  # no temporary left


def test_read_coords_errors(tmp_path):
    import h5py

    with pytest.raises(CoordsFileError, match=r"none\.h5: coords file not found"):
        read_coords(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(CoordsFileError, match=r"text\.h5: not a readable HDF5"):
        read_coords(tmp_path / "text.h5")
    with h5py.File(tmp_path / "bare.h5", "w") as h5:
        h5["coords"] = np.zeros((3, 2), dtype=np.int64)
    with pytest.raises(CoordsFileError, match=r"bare\.h5: missing attributes .*patch_size"):
        read_coords(tmp_path / "bare.h5")


@needs_cmu()
def test_real_svs_tiles_on_tissue():
    with open_slide(CMU_SVS) as slide:
        result = tile_slide(slide, TilingConfig())
        assert result.spec.size_level0 == 257  # 256 px at 0.5 um/px from 0.499 um/px
        assert 10 < len(result.coords) < result.n_candidates
        tiles = [slide.read_tile(x, y, 257, 256) for x, y in result.coords[:5]]
    for tile in tiles:
        assert tile.shape == (256, 256, 3) and tile.mean() < 225  # stained, not glass


def test_mask_none_keeps_every_tile_the_blank_filter_allows(pyramid_tiff):
    cfg = TilingConfig(patch_size=64, mpp=0.5, mask="none", max_blank_fraction=1.0)
    with open_slide(pyramid_tiff) as slide:
        everything = tile_slide(slide, cfg)
        filtered = tile_slide(slide, cfg.model_copy(update={"max_blank_fraction": 0.3}))
    assert everything.mask_kind == "none" and len(everything.coords) == everything.n_candidates
    assert 0 < len(filtered.coords) < len(everything.coords)


def test_tiles_on_pen_ink_are_dropped_inside_an_annotation(tmp_path):
    """A pathologist's blue stroke through an annotated region: the tiles it crosses go, with
    `remove_pen`, though the polygon covers them; without it they stay."""
    from .helpers import tissue_image

    rgb, truth = tissue_image(1200, 1600, seed=5)
    stroke = np.zeros(truth.shape, dtype=bool)
    stroke[590:602, 100:1500] = True  # 12 px wide, right across both tissue regions
    rgb[stroke] = (40, 70, 170)
    path = write_pyramid_tiff(tmp_path / "inked.tif", rgb, mpp=0.25)
    ann = _polygon_json(tmp_path / "all.json", [[0, 0], [1600, 0], [1600, 1200], [0, 1200]])
    with open_slide(path) as slide:
        cleaned = tile_slide(slide, TilingConfig(patch_size=64, mpp=0.5), annotations_path=ann)
        inked = tile_slide(
            slide, TilingConfig(patch_size=64, mpp=0.5, remove_pen=False), annotations_path=ann
        )
    side = cleaned.spec.size_level0

    def on_ink(coords):
        return [(x, y) for x, y in coords if stroke[y : y + side, x : x + side].any()]

    assert cleaned.mask_kind == "annotations"
    assert len(on_ink(inked.coords)) >= 5  # the blank filter alone keeps them
    assert on_ink(cleaned.coords) == []
    assert len(cleaned.coords) > len(inked.coords) - 2 * len(on_ink(inked.coords))
    assert cleaned.pen is not None and cleaned.pen.any() and inked.pen is None
