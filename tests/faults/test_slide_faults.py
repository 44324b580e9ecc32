"""Slides that change under the tiles and extraction that meets a hostile machine, through the
real CLI on a small cohort (patch folders and one pyramidal TIFF): a rescanned slide is tiled,
extracted and trained on again; a patch folder changed since tiling is read by the names it had;
a full disk and an offline Hub are one clear error line each."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from bidistill.features.extract import ExtractionJob
from bidistill.features.tiles import TileBatches
from bidistill.slides import coords_path, read_coords

from ..slides.helpers import tissue_image, write_pyramid_tiff
from .conftest import assert_one_line_error, edit_config, invoke

RESCANNED = "P001"  # the pyramidal TIFF among the patch folders


def _fast(raw) -> None:
    raw["features"].update(num_workers=0, batch_size=16)
    raw["methods"] = ["wsi-only"]
    raw["training"] = {"epochs": 1, "batch_size": 4, "patience": 1, "device": "cpu", "seed": 0}
    raw["evaluation"] = {"mask_seeds": 1, "bootstrap": 10}


@pytest.fixture(scope="module")
def tiled_project(tmp_path_factory) -> Path:
    """A cohort of 12 slides (P001 a pyramidal TIFF, the others patch folders), tiled."""
    from bidistill.synthetic.patches import make_patch_cohort

    config = make_patch_cohort(tmp_path_factory.mktemp("slides") / "p", patients=12)
    slides = config.parent / "slides"
    shutil.rmtree(slides / RESCANNED)
    write_pyramid_tiff(slides / f"{RESCANNED}.tif", tissue_image(256, 320, seed=1)[0], mpp=0.5)
    edit_config(config, _fast)
    result = invoke("tile", config)
    assert result.exit_code == 0, result.output
    return config


@pytest.fixture
def project(tiled_project, tmp_path) -> Path:
    """A private copy of the tiled project (file times kept: a moved project folder)."""
    copied = shutil.copytree(tiled_project.parent, tmp_path / "p")
    return copied / tiled_project.name


def _rescan(config: Path) -> Path:
    """Replace P001's slide with another scan under the same name."""
    path = config.parent / "slides" / f"{RESCANNED}.tif"
    path.unlink()
    return write_pyramid_tiff(path, tissue_image(288, 320, seed=7)[0], mpp=0.5)


def _features(config: Path, slide_id: str) -> np.ndarray:
    with h5py.File(config.parent / "features" / f"{slide_id}.h5", "r") as h5:
        return h5["features"][()]


def _stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.h5"))}


# --- a slide replaced under the same id ----------------------------------------------------------


def test_a_rescanned_slide_is_tiled_and_extracted_again(project):
    assert invoke("extract", project, "--no-progress").exit_code == 0
    before = _features(project, RESCANNED)
    others = {k: v for k, v in _stamps(project.parent / "features").items() if RESCANNED not in k}
    rescanned = _rescan(project)

    # Extracting the old tiles of the new scan is refused, with the command that fixes it.
    refused = invoke("extract", project, "--no-progress")
    assert_one_line_error(refused, str(rescanned), "changed since it was tiled", "bidistill tile")

    tiled = invoke("tile", project)
    assert tiled.exit_code == 0, tiled.output
    assert "tiled 1 slide " in tiled.output and f"redone {RESCANNED}" in tiled.output
    assert "changed since it was tiled" in tiled.output
    assert read_coords(coords_path(project.parent / "coords", RESCANNED)).attrs["slide_size"] == (
        rescanned.stat().st_size
    )

    extracted = invoke("extract", project, "--no-progress")
    assert extracted.exit_code == 0, extracted.output
    assert "extracted 1 slide " in extracted.output and f"redone {RESCANNED}" in extracted.output
    after = _features(project, RESCANNED)
    assert after.shape != before.shape or not np.allclose(after, before)
    now = _stamps(project.parent / "features")
    assert {k: now[k] for k in others} == others  # the other slides are not redone

    again = invoke("extract", project, "--no-progress")
    assert "extracted 0 slides" in again.output and "12 already done" in again.output


def test_a_moved_project_keeps_its_tiles_and_features(project, tmp_path):
    assert invoke("extract", project, "--no-progress").exit_code == 0
    moved = shutil.copytree(project.parent, tmp_path / "elsewhere") / project.name
    tiled = invoke("tile", moved)
    assert "tiled 0 slides" in tiled.output and "12 already done" in tiled.output
    extracted = invoke("extract", moved, "--no-progress")
    assert "extracted 0 slides" in extracted.output and "12 already done" in extracted.output


@pytest.mark.slow
def test_run_retrains_on_a_rescanned_slide(project, tmp_path):
    from bidistill.experiment import run_experiment

    first = run_experiment(project, tmp_path / "run", progress=False)
    assert first.trained == ["wsi-only"]
    assert run_experiment(project, tmp_path / "run", progress=False).trained == []
    before = _features(project, RESCANNED)
    _rescan(project)
    again = run_experiment(project, tmp_path / "run", progress=False)
    assert again.trained == ["wsi-only"]
    after = _features(project, RESCANNED)
    assert after.shape != before.shape or not np.allclose(after, before)


# --- a patch folder changed after tiling ---------------------------------------------------------


def _loader_tiles(config: Path, slide_id: str):
    """What extraction's loader reads for a slide: (pixels [n, H, W, 3] or None, error)."""
    job = ExtractionJob(
        slide_id=slide_id,
        slide_path=config.parent / "slides" / slide_id,
        coords_path=coords_path(config.parent / "coords", slide_id),
        target=config.parent / "features" / f"{slide_id}.h5",
        mpp=0.5,
    )
    chunks = list(TileBatches([job], batch_size=64, cache_dir=config.parent / "coords" / ".cache"))
    if chunks[-1].error is not None:
        return None, chunks[-1].error
    return np.concatenate([c.pixels.numpy() for c in chunks]), None


def _patch(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_a_patch_added_after_tiling_does_not_shift_the_tiles(project):
    folder = project.parent / "slides" / "P002"
    names = read_coords(coords_path(project.parent / "coords", "P002")).paths
    Image.new("RGB", (32, 32), (0, 0, 0)).save(folder / "000-added.png")  # sorts first
    pixels, error = _loader_tiles(project, "P002")
    assert error is None and len(pixels) == len(names)
    for tile, name in zip(pixels, names):
        np.testing.assert_array_equal(tile, _patch(folder / name))


def test_a_patch_removed_after_tiling_is_a_clear_error(project):
    folder = project.parent / "slides" / "P002"
    names = read_coords(coords_path(project.parent / "coords", "P002")).paths
    (folder / names[-1]).unlink()
    pixels, error = _loader_tiles(project, "P002")
    assert pixels is None
    assert names[-1] in error and "changed since it was tiled" in error
    assert "bidistill tile" in error and "IndexError" not in error

    # The command: one line naming the folder and the fix; retiling reads the folder as it is.
    refused = invoke("extract", project, "--no-progress")
    message = assert_one_line_error(refused, str(folder), "bidistill tile")
    assert "IndexError" not in message and "bug in bidistill" not in message
    assert invoke("tile", project).exit_code == 0
    assert len(read_coords(coords_path(project.parent / "coords", "P002")).paths) == len(names) - 1
    assert invoke("extract", project, "--no-progress").exit_code == 0


def test_end_to_end_bags_read_the_patches_recorded_at_tiling(project):
    from bidistill.training.tile_bags import BagSpec, TileBags, TileIndex, read_slide_tiles

    folder = project.parent / "slides" / "P002"
    coords = coords_path(project.parent / "coords", "P002")
    names = read_coords(coords).paths
    Image.new("RGB", (32, 32), (0, 0, 0)).save(folder / "000-added.png")  # sorts first
    tiles = read_slide_tiles("P002", folder, coords, 0.5)
    bags = TileBags(
        TileIndex([tiles], [[0]]),
        np.zeros((1, 1)),
        np.ones((1, 1), bool),
        np.ones(1, bool),
        None,
        augment=None,
        cache_dir=None,
    )
    pixels = bags[BagSpec(0, list(range(len(names))), None)]["pixels"]
    for tile, name in zip(pixels, names):
        np.testing.assert_array_equal(tile.permute(1, 2, 0).numpy(), _patch(folder / name))


@pytest.mark.slow
def test_heatmap_montage_shows_the_patches_that_were_encoded(project, tmp_path, caplog):
    from bidistill.experiment import run_experiment

    run_experiment(project, tmp_path / "run", progress=False)
    folder = project.parent / "slides" / "P002"
    features = project.parent / "features" / "P002.h5"
    args = ["heatmap", "--run", tmp_path / "run", "--features", features, "--slides", folder]
    Image.new("RGB", (32, 32), (0, 0, 0)).save(folder / "000-added.png")  # sorts first
    with caplog.at_level("WARNING", logger="bidistill"):
        shown = invoke(*args, "--out", tmp_path / "maps")
    assert shown.exit_code == 0, shown.output
    assert (tmp_path / "maps" / "P002.montage.png").is_file()
    assert "1 patch added since the folder was tiled is left out" in caplog.text

    names = read_coords(coords_path(project.parent / "coords", "P002")).paths
    (folder / names[-1]).unlink()
    refused = invoke(*args, "--out", tmp_path / "maps2")
    message = assert_one_line_error(refused, str(folder), names[-1], "bidistill tile")
    assert "IndexError" not in message and "bug in bidistill" not in message


# --- a full disk ---------------------------------------------------------------------------------


def _cli(*args, limit_bytes: int | None = None, env: dict | None = None, timeout: int = 300):
    """``python -m bidistill ARGS`` in a subprocess, under a file size limit when given (a disk
    that fills up: writes past the limit fail with EFBIG, as with ENOSPC on a full disk)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-m", "bidistill", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        preexec_fn=limit if limit_bytes else None,
    )


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output and "bug in bidistill" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    return errors[0]


def test_a_full_disk_during_extract_is_one_error_and_the_rerun_completes(project):
    features = project.parent / "features"
    full = _cli("extract", project, "--no-progress", limit_bytes=3000)
    error = _one_error_line(full)
    assert str(features) in error and ".h5" in error and "free space" in error
    assert not list(features.glob("*.h5")) and not list(features.glob(".*tmp*"))
    rerun = invoke("extract", project, "--no-progress")  # in this process: the disk has room
    assert rerun.exit_code == 0, rerun.output
    assert len(list(features.glob("*.h5"))) == 12


# --- no internet ---------------------------------------------------------------------------------


def test_offline_extract_fails_at_once_and_names_both_ways_out(project, tmp_path):
    edit_config(project, lambda raw: raw["features"].update(encoder="timm:test_vit"))
    edit_config(project, lambda raw: raw["features"].pop("random_init"))
    offline = {
        "HF_HOME": str(tmp_path / "empty-hf-home"),  # the weights are not cached
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: the Hub is unreachable
    }
    done = _cli("extract", project, "--no-progress", env=offline)
    error = _one_error_line(done)
    assert "features.checkpoint" in error and "features.random_init: true" in error
    assert "Retrying" not in done.stderr  # no minute of retries before the error
    assert not list((project.parent / "features").glob("*.h5"))
