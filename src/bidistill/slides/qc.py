"""QC images: what a user opens to trust the tiling.

Whole slides: the thumbnail with the mask outline (green) and every kept tile (yellow, filled
translucent). Patch folders: a contact sheet of the first patches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from bidistill._io import atomic_path
from bidistill.slides.reader import PatchFolder
from bidistill.slides.tiling import SlideTiling

QC_SIDE = 2048  # longest side of a QC image
MASK_COLOUR = (0, 200, 0, 255)
TILE_FILL = (255, 210, 0, 50)
TILE_EDGE = (255, 170, 0, 160)


def qc_path(coords_dir: str | Path, slide_id: str) -> Path:
    return Path(coords_dir) / "qc" / f"{slide_id}.png"


def _save_png(target: Path, image: Image.Image) -> Path:
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG", optimize=False)
    return target


def draw_tiling(tiling: SlideTiling) -> Image.Image:
    """The QC picture of a whole slide's tiling, at most ``QC_SIDE`` pixels a side."""
    h, w = tiling.thumbnail.shape[:2]
    shrink = max(1.0, max(h, w) / QC_SIDE)
    size = (max(1, round(w / shrink)), max(1, round(h / shrink)))
    base = Image.fromarray(tiling.thumbnail).resize(size, Image.Resampling.BOX).convert("RGBA")
    mask = np.asarray(Image.fromarray(tiling.mask).resize(size, Image.Resampling.NEAREST))
    outline = mask & ~ndimage.binary_erosion(mask, iterations=2, border_value=0)

    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    dx, dy = tiling.downsample[0] * shrink, tiling.downsample[1] * shrink
    side = tiling.spec.size_level0
    for x, y in tiling.coords.tolist():
        box = (x / dx, y / dy, (x + side) / dx - 1, (y + side) / dy - 1)
        draw.rectangle(box, fill=TILE_FILL, outline=TILE_EDGE)
    edge = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    edge[outline] = MASK_COLOUR
    picture = Image.alpha_composite(base, overlay)
    picture = Image.alpha_composite(picture, Image.fromarray(edge, mode="RGBA"))
    return picture.convert("RGB")


def write_tiling_qc(target: Path, tiling: SlideTiling) -> Path:
    """Write the QC PNG of a whole slide (atomically)."""
    return _save_png(target, draw_tiling(tiling))


def write_patch_folder_qc(
    target: Path, folder: PatchFolder, *, n: int = 64, side: int = 96
) -> Path:
    """Write a contact sheet of the first ``n`` patches of a folder (atomically)."""
    count = min(n, len(folder.patch_paths))
    cols = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / cols))
    sheet = Image.new("RGB", (cols * side, rows * side), (255, 255, 255))
    for i in range(count):
        patch = Image.fromarray(folder.read_tile(i, 0, folder.patch_width, side))
        sheet.paste(patch, ((i % cols) * side, (i // cols) * side))
    return _save_png(target, sheet)
