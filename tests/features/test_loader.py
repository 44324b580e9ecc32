"""The extraction loader (workers decoding into shared-memory batches that are reused) gives
features identical, bit for bit on the CPU, to tiles read with the slide reader and preprocessed
by hand as ``Preprocess`` documents: resize, centre crop, scale, normalise."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from bidistill.config import FeaturesConfig, TilingConfig
from bidistill.features import read_feature_file
from bidistill.features.encoders import load_encoder
from bidistill.features.extract import ExtractionJob, extract_features
from bidistill.features.tiles import PREFETCH, load_tiles
from bidistill.slides import SlideJob, coords_path, open_slide, read_coords, tile_cohort

from ..slides.helpers import tissue_image, write_jpeg, write_pyramid_tiff

BATCH = 3  # small: each worker fills its slots several times over
SLOTS = PREFETCH + 1


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, list[ExtractionJob]]:
    """Five tiled slides: pyramidal TIFFs (E at 0.25 um/px: a coarser level read and resized
    to the tile size), a plain JPEG (the tiled cache) and a patch folder of odd sizes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("loader")
    slides = root / "slides"
    slides.mkdir()
    write_pyramid_tiff(slides / "A.tif", tissue_image(640, 700, seed=11)[0], mpp=0.5)
    write_pyramid_tiff(slides / "B.tif", tissue_image(500, 900, seed=12)[0], mpp=0.5)
    write_jpeg(slides / "C.jpg", tissue_image(700, 640, seed=13)[0])
    (slides / "D").mkdir()
    rng = np.random.default_rng(14)
    for i in range(7):
        side = 50 + 9 * i  # resized to the tile size on reading
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
            slides / "D" / f"p{i}.png"
        )
    write_pyramid_tiff(slides / "E.tif", tissue_image(1200, 1200, seed=15)[0], mpp=0.25)
    slide_jobs = [
        SlideJob("A", slides / "A.tif"),
        SlideJob("B", slides / "B.tif"),
        SlideJob("C", slides / "C.jpg", mpp=0.5),
        SlideJob("D", slides / "D", mpp=1.0),
        SlideJob("E", slides / "E.tif"),
    ]
    tiling = TilingConfig(coords_dir=root / "coords", patch_size=32, mpp=1.0)
    tile_cohort(slide_jobs, tiling, progress=False)
    jobs = [
        ExtractionJob(
            slide_id=s.slide_id,
            slide_path=s.path,
            coords_path=coords_path(tiling.coords_dir, s.slide_id),
            target=root / "features" / f"{s.slide_id}.h5",
            mpp=s.mpp,
        )
        for s in slide_jobs
    ]
    return root, jobs


def _by_hand(encoder, job: ExtractionJob, cache_dir: Path) -> np.ndarray:
    """The slide's features from its tiles read one by one, preprocessed as documented, in the
    batches extraction makes (a batch starts at a multiple of the batch size in its slide)."""
    tiles = read_coords(job.coords_path)
    with open_slide(job.slide_path, job.mpp, cache_dir=cache_dir, tile_names=tiles.paths) as s:
        pixels = np.stack(
            [s.read_tile(x, y, tiles.patch_size_level0, tiles.patch_size) for x, y in tiles.coords]
        )
    p = encoder.preprocess
    mean = torch.tensor(p.mean).view(1, 3, 1, 1)
    std = torch.tensor(p.std).view(1, 3, 1, 1)
    top = (p.resize - p.size) // 2
    out = []
    with torch.inference_mode():
        for start in range(0, len(pixels), BATCH):
            x = torch.from_numpy(pixels[start : start + BATCH]).permute(0, 3, 1, 2).float() / 255
            x = torch.nn.functional.interpolate(
                x, size=(p.resize, p.resize), mode="bicubic", antialias=True, align_corners=False
            ).clamp(0, 1)
            x = x[..., top : top + p.size, top : top + p.size]
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            out.append(encoder.model(x).numpy())
    return np.concatenate(out)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_features_equal_tiles_read_and_preprocessed_by_hand(cohort, workers, tmp_path):
    root, jobs = cohort
    encoder = load_encoder("timm:test_vit", random_init=True)
    assert encoder.preprocess.resize and encoder.preprocess.interpolation == "bicubic"
    out = tmp_path / "features"
    jobs = [
        ExtractionJob(j.slide_id, j.slide_path, j.coords_path, out / f"{j.slide_id}.h5", j.mpp)
        for j in jobs
    ]
    features = FeaturesConfig(
        dir=out, encoder="timm:test_vit", random_init=True, batch_size=BATCH, num_workers=workers
    )
    cache_dir = root / "coords" / ".cache"
    summary = extract_features(jobs, features, cache_dir=cache_dir, encoder=encoder, progress=False)
    assert sorted(summary.done) == ["A", "B", "C", "D", "E"] and not summary.failed
    # Enough batches for every worker to reuse each of its slots more than once.
    assert min(summary.done.values()) > BATCH
    assert sum(summary.done.values()) > 2 * workers * SLOTS * BATCH
    for job in jobs:
        got = read_feature_file(job.target).features
        np.testing.assert_array_equal(got, _by_hand(encoder, job, cache_dir), err_msg=job.slide_id)


def test_a_slide_failing_midway_frees_its_slot_and_the_next_slides_load(cohort, tmp_path):
    """A damaged patch fails its slide in the second batch; the worker gives that batch's slot
    back and the slides after it load whole, with the reader's pixels."""
    import shutil

    root, jobs = cohort
    folder = tmp_path / "D"
    shutil.copytree(jobs[3].slide_path, folder)
    (folder / "p4.png").write_bytes(b"not a png")  # tile 4: in the second batch of 3
    broken = ExtractionJob("D", folder, jobs[3].coords_path, tmp_path / "D.h5", 1.0)
    # Worker w reads slides w, w + 2, ...: each meets the broken folder more often than it has
    # slots, so a slot lost with each failure would leave it waiting for ever.
    mixed = [broken, broken, jobs[0], jobs[1]] * (SLOTS + 1)
    cache_dir = root / "coords" / ".cache"
    seen: dict[int, list[np.ndarray]] = {}
    errors: list[str] = []

    def consume() -> None:
        for chunk in load_tiles(mixed, batch_size=BATCH, cache_dir=cache_dir, num_workers=2):
            if chunk.error is not None:
                errors.append(chunk.error)
            else:  # a chunk's pixels are valid until the next one is asked for
                seen.setdefault(chunk.job, []).append(chunk.pixels.numpy().copy())

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    reader.join(timeout=120)
    assert not reader.is_alive(), "the loader stalled: a worker waits for a slot"
    assert len(errors) == 2 * (SLOTS + 1) and all("p4.png" in e for e in errors), errors
    for index, job in enumerate(mixed):
        if job is broken:
            continue
        tiles = read_coords(job.coords_path)
        with open_slide(job.slide_path, job.mpp, cache_dir=cache_dir) as slide:
            expected = np.stack(
                [slide.read_tile(x, y, tiles.patch_size_level0, 32) for x, y in tiles.coords]
            )
        np.testing.assert_array_equal(np.concatenate(seen[index]), expected)


def test_workers_reading_one_slide_at_once_get_its_pixels(tmp_path):
    """Workers forked from a process that had the slide open (libvips caches the open file)
    read it at the same time, each through a file of its own: a shared file offset would
    hand one worker the bytes the other asked for."""
    path = write_pyramid_tiff(tmp_path / "S.tif", tissue_image(2560, 2560, seed=16)[0], mpp=0.5)
    tile_cohort(
        [SlideJob("S", path)],
        TilingConfig(coords_dir=tmp_path / "coords", patch_size=256, mpp=0.5),
        progress=False,
    )
    job = ExtractionJob("S", path, coords_path(tmp_path / "coords", "S"), tmp_path / "S.h5")
    tiles = read_coords(job.coords_path)
    with open_slide(path, cache_dir=tmp_path) as slide:  # this process opens it first
        assert slide.reader == "libvips"
        expected = np.stack([slide.read_tile(x, y, 256, 256) for x, y in tiles.coords])
        chunks = load_tiles([job] * 8, batch_size=8, cache_dir=tmp_path, num_workers=2)
        for chunk in chunks:
            assert chunk.error is None, chunk.error
            got = chunk.pixels.numpy()
            np.testing.assert_array_equal(got, expected[chunk.start : chunk.start + len(got)])
