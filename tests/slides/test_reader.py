"""open_slide on real files through the real libraries (OpenSlide, libvips, Pillow)."""

from __future__ import annotations

import numpy as np
import pytest

from bidistill.errors import SlideError
from bidistill.slides import PatchFolder, WholeSlide, open_slide, require_mpp

from .helpers import (
    CMU_SVS,
    decode_full,
    needs_cmu,
    tissue_image,
    write_jpeg,
    write_pyramid_tiff,
)


def test_pyramidal_tiff_dimensions_levels_mpp_and_exact_pixels(pyramid_tiff, tissue_rgb, tmp_path):
    rgb, _ = tissue_rgb
    with open_slide(pyramid_tiff, cache_dir=tmp_path / "cache") as slide:
        assert isinstance(slide, WholeSlide)
        assert slide.read_path == pyramid_tiff  # read in place, no cache
        assert (slide.width, slide.height) == (1600, 1200)
        assert slide.level_count == 3
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert slide.mpp == pytest.approx(0.25)
        assert slide.mpp_source == "file"
        region = slide.read_region(131, 207, 0, 301, 257)  # odd sizes: a swapped axis fails
        np.testing.assert_array_equal(region, rgb[207:464, 131:432])
    assert not (tmp_path / "cache").exists()


def test_read_tile_reads_the_coarser_level_and_resizes(pyramid_tiff, tissue_rgb):
    rgb, _ = tissue_rgb
    with open_slide(pyramid_tiff) as slide:
        assert slide.best_level(2.0) == 1
        assert slide.best_level(1.9) == 0
        assert slide.best_level(100) == 2
        tile = slide.read_tile(400, 300, 512, 256)  # 2x downsample: read from level 1
        assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8
        expected = rgb[300:812, 400:912].reshape(256, 2, 256, 2, 3).mean((1, 3))
        assert np.abs(tile.astype(float) - expected).mean() < 1.0


def test_config_mpp_fills_in_only_when_the_file_has_none(tmp_path, tissue_rgb):
    no_mpp = write_pyramid_tiff(tmp_path / "nompp.tif", tissue_rgb[0], mpp=None, levels=1)
    with open_slide(no_mpp) as slide:
        assert slide.mpp is None
        with pytest.raises(SlideError, match=r"nompp\.tif.*slides\.mpp.*mpp_column.*mpp: null"):
            require_mpp(slide)
    with open_slide(no_mpp, mpp=0.46) as slide:
        assert slide.mpp == pytest.approx(0.46) and slide.mpp_source == "config"
    with_mpp = write_pyramid_tiff(tmp_path / "mpp.tif", tissue_rgb[0], mpp=0.25, levels=1)
    with open_slide(with_mpp, mpp=0.46) as slide:
        assert slide.mpp == pytest.approx(0.25) and slide.mpp_source == "file"


def test_plain_jpeg_goes_through_a_pyramidal_cache_that_matches_the_source(plain_jpeg, tmp_path):
    cache = tmp_path / "cache"
    source = decode_full(plain_jpeg)
    with open_slide(plain_jpeg, cache_dir=cache) as slide:
        assert slide.path == plain_jpeg
        assert slide.read_path.parent == cache and slide.read_path.suffix == ".tif"
        assert (slide.width, slide.height) == (1600, 1200)
        assert slide.level_count >= 3  # a real pyramid, so thumbnails are cheap
        assert slide.mpp is None  # JPEG's 72 dpi is a screen's, not a microscope's
        region = slide.read_region(257, 129, 0, 333, 211)
    # The cache is JPEG Q90: close to the source (this image is pixel noise, JPEG's worst case),
    # unbiased, and aligned (a shifted read would decorrelate the noise).
    signed = region.astype(float) - source[129:340, 257:590]
    assert np.abs(signed).mean() < 4.0 and abs(signed.mean()) < 0.5
    assert np.corrcoef(region[..., 1].ravel(), source[129:340, 257:590, 1].ravel())[0, 1] > 0.95
    cached = slide.read_path
    stamp = cached.stat().st_mtime_ns
    with open_slide(plain_jpeg, mpp=0.5, cache_dir=cache) as again:
        assert again.read_path == cached and cached.stat().st_mtime_ns == stamp  # reused
        assert again.mpp == 0.5 and again.mpp_source == "config"


def test_cache_is_a_pyramidal_tiff_that_openslide_reads_with_its_mpp(tmp_path, tissue_rgb):
    import openslide

    jpg = write_jpeg(tmp_path / "a.jpg", tissue_rgb[0])
    with open_slide(jpg, mpp=0.5, cache_dir=tmp_path / "cache") as slide:
        ours = slide.read_region(300, 200, 1, 200, 150)
        cache = slide.read_path
    with open_slide(cache) as direct:  # the cache itself, through OpenSlide
        assert direct.properties["openslide.vendor"] == "generic-tiff"
        assert direct.mpp == pytest.approx(0.5) and direct.mpp_source == "file"
        np.testing.assert_array_equal(direct.read_region(300, 200, 1, 200, 150), ours)
    assert openslide.OpenSlide(str(cache)).level_count >= 3


def test_regions_past_the_edge_are_white(plain_jpeg, tmp_path):
    with open_slide(plain_jpeg, cache_dir=tmp_path / "cache") as slide:
        inside = slide.read_region(1500, 1100, 0, 100, 100)
        region = slide.read_region(1500, 1100, 0, 150, 130)  # image is 1600 x 1200
    np.testing.assert_array_equal(region[:100, :100], inside)
    assert (region[100:] == 255).all() and (region[:, 100:] == 255).all()


def test_plain_image_mpp_from_plausible_resolution_tags(tmp_path, tissue_rgb):
    from PIL import Image

    path = tmp_path / "scanned.tif"  # non-pyramidal, strip TIFF: not OpenSlide's
    dpi = 25400 / 0.5  # 0.5 um/px
    Image.fromarray(tissue_rgb[0]).save(path, dpi=(dpi, dpi))
    with open_slide(path, cache_dir=tmp_path / "cache") as slide:
        assert slide.read_path != path
        assert slide.mpp == pytest.approx(0.5, rel=1e-3) and slide.mpp_source == "file"


def test_pillow_decompression_bomb_limit_does_not_stop_a_slide(monkeypatch, plain_jpeg, tmp_path):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with open_slide(plain_jpeg, cache_dir=tmp_path / "cache") as slide:
        assert slide.read_tile(0, 0, 256, 64).shape == (64, 64, 3)
        thumb, _ = slide.thumbnail(8)
        assert thumb.shape == (150, 200, 3)


def test_png_with_alpha_and_grey_images_become_rgb(tmp_path):
    from PIL import Image

    rgba = np.zeros((300, 400, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :200, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.fromarray(np.full((300, 400), 90, dtype=np.uint8)).save(tmp_path / "g.png")
    with open_slide(tmp_path / "a.png", cache_dir=tmp_path / "c") as slide:
        region = slide.read_region(0, 0, 0, 400, 300)
    assert np.abs(region[:, :190].astype(int) - (200, 0, 0)).max() <= 12
    assert np.abs(region[:, 210:].astype(int) - 255).max() <= 12  # transparent → white
    with open_slide(tmp_path / "g.png", cache_dir=tmp_path / "c") as slide:
        assert np.abs(slide.read_region(0, 0, 0, 50, 50).astype(int) - 90).max() <= 4


def test_thumbnail_reports_its_exact_scale(pyramid_tiff):
    with open_slide(pyramid_tiff) as slide:
        thumb, (dx, dy) = slide.thumbnail(3.0)
    assert thumb.shape == (400, 533, 3)
    assert dx == pytest.approx(1600 / 533) and dy == pytest.approx(3.0)


def test_thumbnail_of_a_big_level_is_read_in_strips(monkeypatch, tmp_path, tissue_rgb):
    from bidistill.slides import reader

    single = write_pyramid_tiff(tmp_path / "flat.tif", tissue_rgb[0], mpp=0.5, levels=1)
    with open_slide(single) as slide:
        whole, _ = slide.thumbnail(4.0)
        monkeypatch.setattr(reader, "THUMBNAIL_READ_PIXELS", 100_000)  # 1600 x 1200 is over
        strips, scale = slide.thumbnail(4.0)
    assert strips.shape == whole.shape == (300, 400, 3) and scale == (4.0, 4.0)
    assert np.abs(strips.astype(int) - whole).max() <= 1


def test_patch_folder_is_a_slide_whose_tiles_are_its_files(patch_folder):
    from PIL import Image

    with open_slide(patch_folder, mpp=0.5) as slide:
        assert isinstance(slide, PatchFolder)
        assert [p.name for p in slide.patch_paths] == [f"P7_{i:02d}.png" for i in range(5)]
        assert (slide.width, slide.height) == (5, 1)
        assert (slide.patch_width, slide.patch_height) == (64, 64)
        tile = slide.read_tile(3, 0, 64, 64)
        np.testing.assert_array_equal(tile, np.asarray(Image.open(patch_folder / "P7_03.png")))
        assert slide.read_tile(3, 0, 64, 32).shape == (32, 32, 3)


def test_empty_patch_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideError, match=r"empty.*no image files"):
        open_slide(tmp_path / "empty")


@needs_cmu()
def test_real_aperio_svs():
    with open_slide(CMU_SVS) as slide:
        assert (slide.width, slide.height) == (2220, 2967)
        assert slide.level_count == 1
        assert slide.mpp == pytest.approx(0.499, abs=1e-3) and slide.mpp_source == "file"
        assert slide.properties["openslide.vendor"] == "aperio"
        region = slide.read_region(1000, 1500, 0, 480, 480)
        tile = slide.read_tile(1000, 1500, 480, 240)  # 1 um/px from the 0.5 um/px level 0
    assert region.shape == (480, 480, 3) and 60 < region.mean() < 240  # tissue, not blank
    assert region.std() > 10
    expected = region.reshape(240, 2, 240, 2, 3).mean((1, 3))
    assert np.abs(tile - expected).max() <= 1.0


# --- bad files ----------------------------------------------------------------------------------


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(SlideError, match=r"nowhere\.svs: slide file not found"):
        open_slide(tmp_path / "nowhere.svs")


def test_text_file_named_svs_is_refused(tmp_path):
    fake = tmp_path / "fake.svs"
    fake.write_text("this is not a slide\n" * 20)
    with pytest.raises(SlideError, match=r"fake\.svs: not a slide OpenSlide can read"):
        open_slide(fake)


def test_text_file_named_jpg_is_refused(tmp_path):
    fake = tmp_path / "fake.jpg"
    fake.write_text("hello")
    with pytest.raises(SlideError, match=r"fake\.jpg: not a readable image"):
        open_slide(fake, cache_dir=tmp_path / "cache")


def test_truncated_jpeg_is_an_error_and_leaves_no_cache(tmp_path):
    rgb, _ = tissue_image(800, 1000, seed=5)
    whole = write_jpeg(tmp_path / "whole.jpg", rgb).read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(SlideError, match=r"cut\.jpg: cannot decode image"):
        open_slide(cut, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").glob("*")) == []  # no half-written cache left behind


def test_unsupported_extension(tmp_path):
    path = tmp_path / "slide.xyz"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(SlideError, match=r"slide\.xyz: unsupported slide format '\.xyz'.*svs"):
        open_slide(path)
