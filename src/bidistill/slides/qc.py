"""QC images: what a user opens to trust the tiling. Whole slides: the thumbnail with the mask
outline, marker ink and kept tiles, a header and a scale bar; patch folders: a contact sheet.
The cohort overview shows the fewest tiles first, so that empty slides are seen first.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from bidistill._io import atomic_path, is_temp_file
from bidistill._text import count
from bidistill.slides.reader import PatchFolder
from bidistill.slides.tiling import SlideTiling

QC_SIDE = 2048  # longest side of a QC image's picture
MASK_COLOUR = (0, 200, 0, 255)
PEN_COLOUR = (230, 0, 200, 110)
TILE_FILL = (255, 210, 0, 50)
TILE_EDGE = (255, 170, 0, 160)
INK = (25, 25, 30)
MUTED = (95, 95, 105)
OVERVIEW = "overview.png"
OVERVIEW_CELL = 240  # px, longest side of a slide on the overview
OVERVIEW_MAX = 96  # slides shown on the overview


def qc_path(coords_dir: str | Path, slide_id: str) -> Path:
    return Path(coords_dir) / "qc" / f"{slide_id}.png"


def _save_png(target: Path, image: Image.Image) -> Path:
    with atomic_path(target) as tmp:
        # zlib level 1: twice as fast as Pillow's default 6 for 1.2x the bytes; a QC picture
        # of every slide is written while tiling, where level 6 took a third of the time.
        image.save(tmp, format="PNG", compress_level=1)
    return target


def _font(size: float) -> ImageFont.ImageFont:
    """DejaVu Sans, which matplotlib ships (it has µ, which Pillow's built-in font lacks)."""
    from matplotlib import font_manager

    path = font_manager.findfont("DejaVu Sans", fallback_to_default=True)
    return ImageFont.truetype(path, size=max(10, int(size)))


def write_tiling_qc(target: Path, tiling: SlideTiling) -> Path:
    """Write the QC PNG of a whole slide's tiling (atomically): header, picture and scale bar;
    the slide id is the file's stem."""
    picture, shrink = _picture(tiling)
    mpp = _thumbnail_mpp(tiling)
    if mpp is not None:
        _scale_bar(picture, mpp * shrink)
    n = len(tiling.coords)
    spec = tiling.spec
    size = f"{spec.patch_size} px at {spec.mpp:g} µm/px" if spec.mpp else f"{spec.patch_size} px"
    title = f"{Path(target).stem}: {count(n, 'tile')}"
    subtitle = (
        f"{size}; kept {n} of {tiling.n_candidates} grid positions; mask: {tiling.mask_kind}"
        + ("" if mpp is not None else "; no scale bar: the slide's MPP is unknown")
    )
    legend = [
        ("fill", TILE_FILL, TILE_EDGE, "kept tile"),
        ("line", MASK_COLOUR, MASK_COLOUR, f"mask ({tiling.mask_kind})"),
    ]
    if tiling.pen is not None and tiling.pen.any():
        legend.append(("fill", PEN_COLOUR, PEN_COLOUR, "marker ink (tiles on it dropped)"))
    return _save_png(target, _with_header(picture, title, subtitle, legend))


def _picture(tiling: SlideTiling) -> tuple[Image.Image, float]:
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
    layers = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    if tiling.pen is not None:
        pen = np.asarray(Image.fromarray(tiling.pen).resize(size, Image.Resampling.NEAREST))
        layers[pen] = PEN_COLOUR
    layers[outline] = MASK_COLOUR
    picture = Image.alpha_composite(base, overlay)
    picture = Image.alpha_composite(picture, Image.fromarray(layers, mode="RGBA"))
    return picture.convert("RGB"), shrink


def _thumbnail_mpp(tiling: SlideTiling) -> float | None:
    """Microns per thumbnail pixel (None when the slide's MPP is unknown)."""
    spec = tiling.spec
    if not spec.mpp:
        return None
    level0_mpp = spec.mpp * spec.patch_size / spec.size_level0
    return level0_mpp * float(np.mean(tiling.downsample))


def _scale_bar(picture: Image.Image, microns_per_px: float) -> None:
    """A bar of a round length (about a fifth of the width) in the bottom-left corner."""
    target = picture.width / 5 * microns_per_px
    length = _round_length(target)
    px = max(1, round(length / microns_per_px))
    label = f"{length / 1000:g} mm" if length >= 1000 else f"{length:g} µm"
    font = _font(max(12, picture.width / 70))
    draw = ImageDraw.Draw(picture)
    pad = max(6, picture.width // 150)
    text_h = font.getbbox(label)[3]
    bar_h = max(3, picture.width // 300)
    x0, y1 = pad * 2, picture.height - pad * 2
    box = (
        x0 - pad,
        y1 - bar_h - text_h - 3 * pad,
        x0 + max(px, font.getlength(label)) + pad,
        y1 + pad,
    )
    draw.rectangle(box, fill=(255, 255, 255))
    draw.rectangle((x0, y1 - bar_h, x0 + px, y1), fill=INK)
    draw.text((x0, y1 - bar_h - text_h - pad), label, fill=INK, font=font)


def _round_length(microns: float) -> float:
    """The largest 1, 2 or 5 x 10^k not above ``microns``."""
    exponent = math.floor(math.log10(max(microns, 1e-6)))
    for step in (5, 2, 1):
        if step * 10**exponent <= microns:
            return step * 10**exponent
    return 10**exponent


def _with_header(
    picture: Image.Image, title: str, subtitle: str, legend: list[tuple]
) -> Image.Image:
    """The picture under a white band holding a title, a subtitle and a legend."""
    width = max(picture.width, 900)
    unit, band = _band(width)
    big, small = _font(unit * 1.35), _font(unit)
    pad = int(unit * 0.7)
    line = int(unit * 1.45)
    canvas = Image.new("RGB", (width, band + picture.height), (255, 255, 255))
    canvas.paste(picture, (0, band))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill=INK, font=big)
    y = pad + int(unit * 1.6)
    draw.text((pad, y), subtitle, fill=MUTED, font=small)
    x, y = pad, y + line
    box = int(unit * 0.9)
    for kind, fill, edge, text in legend:
        if kind == "fill":
            swatch = Image.new("RGBA", (box, box), fill)
            canvas.paste(
                Image.alpha_composite(Image.new("RGBA", (box, box), "white"), swatch), (x, y)
            )
            draw.rectangle((x, y, x + box, y + box), outline=edge[:3], width=2)
        else:
            draw.rectangle((x, y, x + box, y + box), outline=edge[:3], width=3)
        x += box + int(unit * 0.4)
        draw.text((x, y - 2), text, fill=INK, font=small)
        x += int(small.getlength(text)) + int(unit * 1.5)
    return canvas


def _band(width: int) -> tuple[float, int]:
    """Text unit and height of the header band of an image ``width`` pixels wide."""
    unit = max(14, width / 60)
    pad, line = int(unit * 0.7), int(unit * 1.45)
    return unit, pad + int(unit * 1.6) + line * 2 + pad


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
    total = len(folder.patch_paths)
    title = f"{Path(target).stem}: {total} patches"
    subtitle = f"patch folder; the first {count} of {total} patches"
    return _save_png(target, _with_header(sheet, title, subtitle, []))


def write_cohort_overview(coords_dir: str | Path) -> Path | None:
    """``<coords_dir>/qc/overview.png``: every slide's QC image on one sheet with its tile
    count, fewest tiles first (at most ``OVERVIEW_MAX`` slides: the fewest half and an even
    sample of the rest). None when no slide has a QC image yet."""
    from bidistill.slides.coords import CoordsFileError, coords_path, read_coords

    coords_dir = Path(coords_dir)
    images = sorted(
        p for p in (coords_dir / "qc").glob("*.png") if p.name != OVERVIEW and not is_temp_file(p)
    )
    counts = {}
    for image in images:
        try:
            counts[image.stem] = len(read_coords(coords_path(coords_dir, image.stem)).coords)
        except CoordsFileError:
            continue  # a QC image without its coords file: a slide being retiled
    if not counts:
        return None
    ranked = sorted(counts, key=lambda s: (counts[s], s))
    shown = _overview_selection(ranked)
    sheet = _overview_sheet(coords_dir / "qc", shown, counts)
    total = sum(counts.values())
    empty = [s for s in ranked if counts[s] == 0]
    median = int(np.median(list(counts.values())))
    title = f"{count(len(counts), 'slide')}, {count(total, 'tile')} (median {median})"
    subtitle = (
        f"fewest tiles first; {count(len(empty), 'slide')} without a tile"
        + (f" ({', '.join(empty[:5])}{', …' if len(empty) > 5 else ''})" if empty else "")
        + ("" if len(shown) == len(ranked) else f"; showing {len(shown)} of {len(ranked)}")
    )
    return _save_png(coords_dir / "qc" / OVERVIEW, _with_header(sheet, title, subtitle, []))


def _overview_selection(ranked: list[str]) -> list[str]:
    if len(ranked) <= OVERVIEW_MAX:
        return ranked
    half = OVERVIEW_MAX // 2
    rest = ranked[half:]
    picks = np.linspace(0, len(rest) - 1, OVERVIEW_MAX - half).round().astype(int)
    return ranked[:half] + [rest[i] for i in picks]


def _overview_sheet(qc_dir: Path, slides: list[str], counts: dict[str, int]) -> Image.Image:
    cols = min(8, len(slides))
    rows = math.ceil(len(slides) / cols)
    label_h = 26
    cell = OVERVIEW_CELL + 12
    sheet = Image.new("RGB", (cols * cell, rows * (cell + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font(15)
    for i, slide_id in enumerate(slides):
        x, y = (i % cols) * cell + 6, (i // cols) * (cell + label_h) + 6
        with Image.open(qc_dir / f"{slide_id}.png") as image:
            # Without its header: the overview labels each slide itself.
            thumb = image.convert("RGB").crop((0, _band(image.width)[1], *image.size))
        thumb.thumbnail((OVERVIEW_CELL, OVERVIEW_CELL), Image.Resampling.BOX)
        sheet.paste(thumb, (x, y))
        colour = (180, 30, 30) if counts[slide_id] == 0 else INK
        label = f"{slide_id}: {counts[slide_id]} tiles"
        draw.text((x, y + thumb.height + 4), label, fill=colour, font=font)
    return sheet
