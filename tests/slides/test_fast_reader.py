"""The libvips fast path for SVS and tiled TIFFs: same pixels as OpenSlide, or OpenSlide itself."""

from __future__ import annotations

import numpy as np
import pytest

from bidistill.slides import open_slide
from bidistill.slides.reader import READER_ENV

from .helpers import CMU_SVS, needs_cmu, write_pyramid_tiff


def _jpeg_pyramid(path, rgb):
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        for level in range(2):
            image = rgb[:: 2**level, :: 2**level]
            tif.write(
                np.ascontiguousarray(image),
                tile=(128, 128),
                photometric="rgb",
                compression="jpeg",
                subfiletype=1 if level else 0,
            )
    return path


def _same_tiles(path, monkeypatch, *, tolerance: int) -> None:
    fast = open_slide(path)
    monkeypatch.setenv(READER_ENV, "openslide")
    reference = open_slide(path)
    monkeypatch.delenv(READER_ENV)
    assert fast.reader == "libvips" and reference.reader == "openslide"
    assert fast.level_dimensions == reference.level_dimensions
    assert fast.properties == reference.properties and fast.mpp == reference.mpp
    # Tiles on the grid of the level they are read from (as tiling makes them): OpenSlide
    # resamples an off-grid origin by a sub-pixel shift, libvips starts at the pixel.
    w, h = fast.width // 4 * 4, fast.height // 4 * 4
    cases = [(0, 0, 256, 256), (w - 300, h - 200, 512, 128), (38, 90, 200, 100), (37, 91, 99, 99)]
    for x, y, size0, size in cases:
        ours = fast.read_tile(x, y, size0, size).astype(int)  # also past the edge: white
        theirs = reference.read_tile(x, y, size0, size).astype(int)
        assert np.abs(ours - theirs).max() <= tolerance, (x, y, size0, size)


def test_a_lossless_tiled_tiff_reads_exactly_as_through_openslide(
    pyramid_tiff, monkeypatch
) -> None:
    _same_tiles(pyramid_tiff, monkeypatch, tolerance=0)


def test_a_jpeg_tiled_tiff_reads_as_through_openslide(tmp_path, tissue_rgb, monkeypatch) -> None:
    _same_tiles(_jpeg_pyramid(tmp_path / "j.tif", tissue_rgb[0]), monkeypatch, tolerance=1)


@needs_cmu()
def test_the_real_svs_reads_as_through_openslide(monkeypatch) -> None:
    _same_tiles(CMU_SVS, monkeypatch, tolerance=1)


def test_the_environment_can_turn_the_fast_path_off(tmp_path, tissue_rgb, monkeypatch) -> None:
    path = write_pyramid_tiff(tmp_path / "p.tif", tissue_rgb[0], mpp=0.5)
    monkeypatch.setenv(READER_ENV, "openslide")
    assert open_slide(path).reader == "openslide"


@pytest.mark.parametrize("levels", [1, 3])
def test_every_level_is_matched_to_its_page(tmp_path, tissue_rgb, levels) -> None:
    path = write_pyramid_tiff(tmp_path / "p.tif", tissue_rgb[0], mpp=0.5, levels=levels)
    slide = open_slide(path)
    assert slide.reader == "libvips" and slide.level_count == levels
