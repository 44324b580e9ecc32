"""Extraction: real slides (pyramidal TIFFs, a plain JPEG, a patch folder, the CMU SVS) through a
tiny timm model to .h5 files; shapes, attributes, reruns, resume, shards, and mixing refused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bidistill.config import FeaturesConfig, TilingConfig
from bidistill.errors import FeatureFileError, SlideError
from bidistill.features import read_feature_file
from bidistill.features.encoders import load_encoder
from bidistill.features.extract import ExtractionJob, extract_features
from bidistill.slide_stages import Shard
from bidistill.slides import SlideJob, coords_path, open_slide, read_coords, tile_cohort

from ..slides.helpers import CMU_SVS, needs_cmu, tissue_image, write_jpeg, write_pyramid_tiff

ENCODER = "timm:test_vit"  # a 64-d ViT of a few hundred kB: real timm code, fast on a CPU


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(ENCODER, random_init=True)


@pytest.fixture(scope="module")
def tiled(tmp_path_factory) -> Path:
    """Four tiled slides: two pyramidal TIFFs, a plain JPEG and a patch folder (D is shard 0 of
    2, the others shard 1)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("extract")
    slides = root / "slides"
    slides.mkdir()
    write_pyramid_tiff(slides / "A.tif", tissue_image(600, 800, seed=1)[0], mpp=0.5)
    write_pyramid_tiff(slides / "B.tif", tissue_image(500, 700, seed=2)[0], mpp=0.5)
    (slides / "C").mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            slides / "C" / f"p{i}.png"
        )
    write_jpeg(slides / "D.jpg", tissue_image(700, 800, seed=4)[0])
    tile_cohort(_slide_jobs(slides), _tiling(root), progress=False)
    return root


def _slide_jobs(slides: Path) -> list[SlideJob]:
    return [
        SlideJob("A", slides / "A.tif"),
        SlideJob("B", slides / "B.tif"),
        SlideJob("C", slides / "C", mpp=1.0),
        SlideJob("D", slides / "D.jpg", mpp=0.5),
    ]


def _tiling(root: Path) -> TilingConfig:
    return TilingConfig(coords_dir=root / "coords", patch_size=64, mpp=1.0)


def _jobs(root: Path, out: Path, slides: Path | None = None) -> list[ExtractionJob]:
    return [
        ExtractionJob(
            slide_id=job.slide_id,
            slide_path=job.path,
            coords_path=coords_path(root / "coords", job.slide_id),
            target=out / f"{job.slide_id}.h5",
            mpp=job.mpp,
        )
        for job in _slide_jobs(slides or root / "slides")
    ]


def _features(out: Path, num_workers: int = 0) -> FeaturesConfig:
    return FeaturesConfig(
        dir=out, encoder=ENCODER, random_init=True, batch_size=3, num_workers=num_workers
    )


def _extract(root: Path, out: Path, encoder, *, slides: Path | None = None, **kw):
    workers = kw.pop("num_workers", 0)
    return extract_features(
        _jobs(root, out, slides),
        _features(out, num_workers=workers),
        cache_dir=root / "coords" / ".cache",
        encoder=encoder,
        progress=False,
        **kw,
    )


@pytest.fixture(scope="module")
def extracted(tiled, encoder, tmp_path_factory):
    """The four slides extracted once, in this process (the reference for other runs)."""
    out = tmp_path_factory.mktemp("single") / "features"
    return out, _extract(tiled, out, encoder)


def test_features_have_the_right_shapes_rows_and_attributes(tiled, encoder, extracted, tmp_path):
    out, summary = extracted
    assert sorted(summary.done) == ["A", "B", "C", "D"] and not summary.failed
    for slide_id in "ABCD":
        tiles = read_coords(tiled / "coords" / f"{slide_id}.h5")
        got = read_feature_file(out / f"{slide_id}.h5")
        assert got.features.shape == (len(tiles.coords), 64) and got.features.dtype == np.float32
        np.testing.assert_array_equal(got.coords, tiles.coords)
        assert summary.done[slide_id] == len(tiles.coords) > 3  # more than one batch
        assert got.attrs["encoder"] == ENCODER and got.attrs["random_init"]
        assert got.attrs["encoder_weights_sha256"] == encoder.weights_sha256
        assert got.attrs["patch_size"] == 64 and got.attrs["mpp"] == 1.0
        assert got.attrs["precision"] == "float32" and got.attrs["bidistill_version"]
        assert np.isfinite(got.features).all() and got.features.std(axis=0).mean() > 1e-3
    assert read_feature_file(out / "A.h5").attrs["level"] == 1  # 1 um/px read from level 1

    # Row i is tile i: encode two tiles of A straight from the slide and compare.
    tiles = read_coords(tiled / "coords" / "A.h5")
    with open_slide(tiled / "slides" / "A.tif") as slide:
        pixels = np.stack(
            [slide.read_tile(x, y, tiles.patch_size_level0, 64) for x, y in tiles.coords[[0, -1]]]
        )
    with torch.inference_mode():
        direct = encoder.model(encoder.preprocess(torch.from_numpy(pixels).permute(0, 3, 1, 2)))
    np.testing.assert_allclose(
        read_feature_file(out / "A.h5").features[[0, -1]], direct.numpy(), atol=1e-5
    )

    # A rerun elsewhere, with two data-loader workers, gives the same values exactly.
    again = tmp_path / "again"
    _extract(tiled, again, encoder, num_workers=2)
    for slide_id in "ABCD":
        np.testing.assert_array_equal(
            read_feature_file(out / f"{slide_id}.h5").features,
            read_feature_file(again / f"{slide_id}.h5").features,
        )


@needs_cmu()
def test_the_real_svs(tmp_path, encoder):
    tiling = TilingConfig(coords_dir=tmp_path / "coords", patch_size=64, mpp=2.0)
    tile_cohort([SlideJob("CMU", CMU_SVS)], tiling, progress=False)
    jobs = [
        ExtractionJob("CMU", CMU_SVS, coords_path(tmp_path / "coords", "CMU"), out / "CMU.h5")
        for out in (tmp_path / "one", tmp_path / "two")
    ]
    for job in jobs:
        extract_features(
            [job], _features(job.target.parent), cache_dir=tmp_path, encoder=encoder, progress=False
        )
    first, second = (read_feature_file(job.target) for job in jobs)
    n = len(read_coords(tmp_path / "coords" / "CMU.h5").coords)
    assert n > 5 and first.features.shape == (n, 64)
    assert first.attrs["patch_size"] == 64 and first.attrs["mpp"] == 2.0
    assert abs(first.attrs["slide_mpp"] - 0.499) < 1e-3  # from the SVS header
    np.testing.assert_array_equal(first.features, second.features)


@pytest.fixture
def broken_b(tiled, tmp_path) -> Path:
    """A copy of the slides in which B (already tiled) is now damaged in place, its size and
    time kept: a read failure (a slide replaced since tiling is refused before any read, see
    tests/faults/test_slide_faults.py)."""
    slides = tmp_path / "slides"
    shutil.copytree(tiled / "slides", slides)
    size = (tiled / "slides" / "B.tif").stat().st_size
    (slides / "B.tif").write_bytes(np.random.default_rng(0).bytes(size))
    stat = (tiled / "slides" / "B.tif").stat()
    os.utime(slides / "B.tif", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return slides


def test_a_failure_stops_the_run_and_a_rerun_resumes(tiled, encoder, tmp_path, broken_b):
    out = tmp_path / "features"
    with pytest.raises(SlideError, match=r"B\.tif.*; pass --skip-errors to go on"):
        _extract(tiled, out, encoder, slides=broken_b)
    written = sorted(p.name for p in out.iterdir() if p.name != "extraction_summary.json")
    assert written == ["A.h5"]  # whole files only: no temporary left behind
    stamp = (out / "A.h5").stat().st_mtime_ns

    shutil.copy2(tiled / "slides" / "B.tif", broken_b / "B.tif")  # the user restores the file
    summary = _extract(tiled, out, encoder, slides=broken_b)
    assert summary.skipped == ["A"] and sorted(summary.done) == ["B", "C", "D"]
    assert (out / "A.h5").stat().st_mtime_ns == stamp


def test_skip_errors_goes_on_and_lists_the_failure(tiled, encoder, tmp_path, broken_b):
    out = tmp_path / "features"
    summary = _extract(tiled, out, encoder, slides=broken_b, skip_errors=True)
    assert list(summary.failed) == ["B"] and "B.tif" in summary.failed["B"]
    assert sorted(summary.done) == ["A", "C", "D"]
    assert not (out / "B.h5").exists()
    assert (out / "extraction_summary.json").is_file()


def test_two_shards_write_the_same_files_as_one_process(tiled, encoder, extracted, tmp_path):
    one, sharded = extracted[0], tmp_path / "sharded"
    first = _extract(tiled, sharded, encoder, shard=Shard.parse("0/2"))
    second = _extract(tiled, sharded, encoder, shard=Shard.parse("1/2"))
    assert sorted(first.done) == ["D"] and sorted(second.done) == ["A", "B", "C"]
    assert first.other_shards == 3 and second.other_shards == 1
    assert sorted(p.name for p in one.glob("*.h5")) == sorted(p.name for p in sharded.glob("*.h5"))
    for path in one.glob("*.h5"):
        a, b = read_feature_file(path), read_feature_file(sharded / path.name)
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.coords, b.coords)
        assert a.attrs == b.attrs


def test_features_of_another_encoder_are_not_added_to_a_folder(tiled, encoder, tmp_path):
    out = tmp_path / "features"
    _extract(tiled, out, encoder, shard=Shard.parse("0/2"))  # D only
    other = load_encoder("timm:test_resnet", random_init=True)
    with pytest.raises(FeatureFileError, match=r"encoder timm:test_resnet in this config's"):
        _extract(tiled, out, other)
    assert sorted(p.name for p in out.glob("*.h5")) == ["D.h5"]


def test_a_slide_that_was_not_tiled_is_a_clear_error(tiled, encoder, tmp_path):
    jobs = _jobs(tiled, tmp_path / "features")
    jobs[0] = ExtractionJob("Z", jobs[0].slide_path, tmp_path / "Z.h5", tmp_path / "f" / "Z.h5")
    with pytest.raises(SlideError, match=r"no tile coordinates for slide 'Z' .*`bidistill tile`"):
        extract_features(
            jobs, _features(tmp_path), cache_dir=tmp_path, encoder=encoder, progress=False
        )
