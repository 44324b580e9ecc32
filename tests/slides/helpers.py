"""Real slide files made in the tests: tissue-like images, pyramidal TIFFs, JPEGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CMU_SVS = SHARED_DATA / "CMU-1-Small-Region.svs"

BACKGROUND = (236, 236, 236)  # white-ish glass
GREY_BACKGROUND = (205, 205, 208)  # core-needle-biopsy scanners' grey


def tissue_image(
    height: int, width: int, *, seed: int = 0, background: tuple[int, int, int] = BACKGROUND
) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like image: two pink ellipses of stroma with purple nuclei on plain glass.

    Returns:
        (rgb uint8 [height, width, 3], truth bool [height, width]: where the tissue is).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    truth = np.zeros((height, width), dtype=bool)
    for cx, cy, rx, ry in ((0.3, 0.4, 0.2, 0.3), (0.72, 0.6, 0.16, 0.25)):
        truth |= ((xx / width - cx) / rx) ** 2 + ((yy / height - cy) / ry) ** 2 <= 1
    rgb = np.empty((height, width, 3), dtype=np.float32)
    rgb[:] = background
    stroma = np.array([225, 140, 185], dtype=np.float32)
    rgb[truth] = stroma + rng.normal(0, 8, (int(truth.sum()), 3))
    nuclei = truth & (rng.random((height, width)) < 0.04)
    rgb[nuclei] = (95, 60, 150)
    rgb[~truth] += rng.normal(0, 2, (int((~truth).sum()), 3))
    return np.clip(rgb, 0, 255).astype(np.uint8), truth


def write_pyramid_tiff(
    path: Path, rgb: np.ndarray, *, mpp: float | None, levels: int = 3, tile: int = 128
) -> Path:
    """A tiled pyramidal TIFF (levels halve in size), lossless, MPP in the resolution tags."""
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        image = rgb
        for level in range(levels):
            extra = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * 2**level)
                extra = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                image,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                subfiletype=1 if level else 0,
                **extra,
            )
            h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
            image = image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)).astype(np.uint8)
    return path


def write_jpeg(path: Path, rgb: np.ndarray, *, quality: int = 95) -> Path:
    from PIL import Image

    Image.fromarray(rgb).save(path, quality=quality)
    return path


def decode_full(path: Path) -> np.ndarray:
    """A whole small image decoded by Pillow: the reference pixels."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def needs_cmu() -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not CMU_SVS.is_file(),
        reason=f"real SVS test data not present ({CMU_SVS}; only in the project's shared folder)",
    )
