"""QC images: a header with the slide id, the tile count and a legend, a scale bar, and a cohort
overview with the emptiest slides first."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bidistill.config import TilingConfig
from bidistill.slides import open_slide, tile_slide
from bidistill.slides.coords import coords_path
from bidistill.slides.qc import (
    OVERVIEW_CELL,
    _band,
    _round_length,
    qc_path,
    write_cohort_overview,
    write_tiling_qc,
)
from bidistill.slides.tiling import write_slide_tiling

from .helpers import tissue_image, write_pyramid_tiff


@pytest.mark.parametrize(
    ("microns", "bar"), [(430.0, 200), (999.0, 500), (1000.0, 1000), (2600.0, 2000), (73, 50)]
)
def test_scale_bar_lengths_are_round(microns, bar):
    assert _round_length(microns) == bar


def _tile(tmp_path, name, rgb, **cfg):
    path = write_pyramid_tiff(tmp_path / f"{name}.tif", rgb, mpp=0.25)
    coords_dir = tmp_path / "coords"
    with open_slide(path) as slide:
        result = tile_slide(slide, TilingConfig(patch_size=64, mpp=0.5, **cfg))
        write_slide_tiling(coords_path(coords_dir, name), slide, result)
    write_tiling_qc(qc_path(coords_dir, name), result)
    return result, coords_dir


def _dark(pixels: np.ndarray) -> np.ndarray:
    return pixels.max(axis=-1) < 80


def test_qc_image_has_header_legend_and_scale_bar(tmp_path):
    rgb, _ = tissue_image(1200, 1600, seed=1)
    result, coords_dir = _tile(tmp_path, "S1", rgb)
    qc = np.asarray(Image.open(qc_path(coords_dir, "S1")).convert("RGB"))
    width = qc.shape[1]
    band = _band(width)[1]
    picture_height = qc.shape[0] - band
    assert picture_height == result.thumbnail.shape[0]  # the thumbnail at full size here
    # The header: white with dark text (title, counts) and the legend's colour swatches.
    header = qc[:band]
    assert (header[:6] == 255).all() and 0.005 < _dark(header).mean() < 0.2
    amber = (header[..., 0] > 230) & (header[..., 1] > 150) & (header[..., 2] < 80)
    assert amber.any()  # the kept-tile swatch's edge
    # The scale bar: a dark horizontal bar, bottom left, as long as its round length says.
    bottom = qc[-picture_height // 6 :, : width // 2]
    rows = _dark(bottom).sum(axis=1)
    bar_px = rows.max()
    microns_per_px = 0.25 * result.downsample[0]  # level-0 MPP x thumbnail downsample
    assert bar_px * microns_per_px == pytest.approx(
        _round_length(width / 5 * microns_per_px), rel=0.02
    )


def test_cohort_overview_puts_the_emptiest_slides_first(tmp_path):
    rich, _ = tissue_image(1200, 1600, seed=1)
    blank = np.full_like(rich, 236)
    _tile(tmp_path, "full", rich)
    _, coords_dir = _tile(tmp_path, "empty", blank)
    overview = write_cohort_overview(coords_dir)
    assert overview == coords_dir / "qc" / "overview.png"
    image = np.asarray(Image.open(overview).convert("RGB"))
    band = _band(image.shape[1])[1]
    sheet = image[band:]
    # Two cells side by side; the first (left) is the empty slide, which has no amber tiles.
    cell = OVERVIEW_CELL + 12
    left, right = sheet[:, :cell], sheet[:, cell : 2 * cell]

    def amber(pixels):
        return ((pixels[..., 0] > 200) & (pixels[..., 1] > 150) & (pixels[..., 2] < 150)).mean()

    assert amber(left) < 0.001 < amber(right)
    red_label = (sheet[..., 0] > 150) & (sheet[..., 1] < 60) & (sheet[..., 2] < 60)
    assert red_label[:, :cell].any() and not red_label[:, cell:].any()  # "empty: 0 tiles"
    assert write_cohort_overview(tmp_path / "nothing") is None
