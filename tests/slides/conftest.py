"""Fixtures: real slide files in tmp_path (a pyramidal TIFF, a plain JPEG, a patch folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .helpers import tissue_image, write_jpeg, write_pyramid_tiff


@pytest.fixture
def tissue_rgb() -> tuple[np.ndarray, np.ndarray]:
    return tissue_image(1200, 1600, seed=1)


@pytest.fixture
def pyramid_tiff(tmp_path: Path, tissue_rgb) -> Path:
    return write_pyramid_tiff(tmp_path / "pyr.tif", tissue_rgb[0], mpp=0.25)


@pytest.fixture
def plain_jpeg(tmp_path: Path, tissue_rgb) -> Path:
    return write_jpeg(tmp_path / "plain.jpg", tissue_rgb[0])


@pytest.fixture
def patch_folder(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "patches" / "P7"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(5):
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"P7_{i:02d}.png")
    (folder / "notes.txt").write_text("not a patch")
    return folder
