"""One way to open every slide a user brings: ``open_slide(path, mpp=None)``.

Pyramidal formats go through OpenSlide (or libvips where it gives OpenSlide's pixels faster).
Plain images (BCNB's JPEGs of tens of thousands of pixels a side) are converted once, streaming,
into a tiled pyramidal TIFF cache that carries the MPP in its resolution tags: a sequential
decode keeps memory flat, and every later tile read is one small JPEG decode
(``benchmarks/bench_tiling.py``). Pillow never opens a slide, so its decompression-bomb limit
cannot refuse one. A folder of pre-cut patches (BCNB's ``paper_patches/<patient>/``) is a slide
whose tiles are its files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bidistill._io import atomic_path, is_temp_file
from bidistill._text import count, verb
from bidistill.errors import SlideError

log = logging.getLogger(__name__)

OPENSLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"
)  # fmt: skip
PLAIN_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
PATCH_SUFFIXES = PLAIN_SUFFIXES
SLIDE_SUFFIXES = tuple(dict.fromkeys(OPENSLIDE_SUFFIXES + PLAIN_SUFFIXES))

# Resolution tags of plain images usually say 72 or 300 dpi (a screen or a printer, not a
# microscope); only values in this range are believed.
PLAUSIBLE_MPP = (0.05, 50.0)
CACHE_TILE = 256  # tile side of the cache TIFF; equal to the default patch size, so reads align
CACHE_QUALITY = 90
DEFAULT_CACHE_ENV = "BIDISTILL_CACHE_DIR"
THUMBNAIL_READ_PIXELS = 64_000_000  # read a level whole for a thumbnail up to this size


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's RGBA (alpha 0 outside the scanned area) over white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    return (rgb * a + 255.0 * (1.0 - a)).round().astype(np.uint8)


def _resize(tile: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 array to ``size`` = (width, height) with a box/area filter."""
    if tile.shape[1] == size[0] and tile.shape[0] == size[1]:
        return tile
    from PIL import Image

    return np.asarray(Image.fromarray(tile).resize(size, Image.Resampling.BOX))


def _into(tile: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``tile``, or ``out`` holding a copy of it."""
    if out is None:
        return tile
    out[...] = tile
    return out


class _OpenSlideReader:
    """Pixels through OpenSlide: every vendor format and any tiled pyramidal TIFF."""

    def __init__(self, path: Path, read_path: Path) -> None:
        import openslide

        self.path = path
        try:
            self.osr = openslide.OpenSlide(str(read_path))
        except (openslide.OpenSlideError, OSError) as err:
            raise SlideError(f"{path}: not a readable slide ({err})") from err
        self.level_dimensions = tuple(self.osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self.osr.level_downsamples)
        self.properties = dict(self.osr.properties)

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        import openslide

        try:
            rgba = self.osr.read_region((x, y), level, (width, height))
        except openslide.OpenSlideError as err:
            raise SlideError(f"{self.path}: cannot read region at ({x}, {y}): {err}") from err
        return _rgba_to_rgb(np.asarray(rgba))

    def close(self) -> None:
        self.osr.close()


class _VipsPyramidReader:
    """Pixels of a tiled pyramidal TIFF through libvips: one page per level, tiles on demand.

    About five times faster than OpenSlide for 256 px tiles (libvips hands back the decoded
    tile; OpenSlide composites it through premultiplied ARGB). Used for our plain-image cache
    and, when their pixels match OpenSlide's, for SVS and generic tiled TIFFs. ``pages``: the
    TIFF page of each level (default: page i is level i, as in the cache).
    """

    def __init__(self, path: Path, read_path: Path, pages: Sequence[int] | None = None) -> None:
        import pyvips

        self.path = path
        try:
            all_pages = _tiff_pages(read_path)
        except pyvips.Error as err:
            raise SlideError(f"{path}: cannot read {read_path} ({err})") from err
        self.pages = all_pages if pages is None else [all_pages[i] for i in pages]
        self.regions = [pyvips.Region.new(page) for page in self.pages]
        self.level_dimensions = tuple((p.width, p.height) for p in self.pages)
        w0 = self.pages[0].width
        self.level_downsamples = tuple(w0 / p.width for p in self.pages)
        self.properties = {"vips.n-pages": str(len(self.pages))}

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        page = self.pages[level]
        ds = self.level_downsamples[level]
        lx, ly = int(x / ds), int(y / ds)
        # Clip to the image; what lies outside is white, as OpenSlide's transparent is.
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, page.width), min(ly + height, page.height)
        if x0 == lx and y0 == ly and x1 - x0 == width and y1 - y0 == height:
            return self._fetch(level, x0, y0, width, height)
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        if x1 > x0 and y1 > y0:  # _fetch turns libvips' errors into SlideError
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = self._fetch(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def _fetch(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        import pyvips

        try:
            data = self.regions[level].fetch(x, y, width, height)
        except pyvips.Error as err:
            raise SlideError(f"{self.path}: cannot read region at ({x}, {y}): {err}") from err
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)

    def close(self) -> None:
        self.regions = []
        self.pages = []


class _ClosedOnExit(contextlib.AbstractContextManager):
    def __exit__(self, *exc: object) -> None:
        self.close()


class WholeSlide(_ClosedOnExit):
    """A whole-slide image: a pyramidal file (OpenSlide) or a plain image's cache (libvips);
    ``read_path`` is where the pixels come from (``path``, or a plain image's cache TIFF)."""

    is_patch_folder = False

    def __init__(
        self,
        path: Path,
        read_path: Path,
        *,
        mpp: float | None,
        mpp_source: str | None,
        reader: str = "openslide",
    ) -> None:
        self.path = path
        self.read_path = read_path
        if reader == "vips":
            self._reader = _VipsPyramidReader(path, read_path)
        else:
            self._reader = _fast_tiff_reader(path, read_path) or _OpenSlideReader(path, read_path)
        self.reader = "libvips" if isinstance(self._reader, _VipsPyramidReader) else "openslide"
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.level_dimensions = self._reader.level_dimensions
        self.level_downsamples = self._reader.level_downsamples
        self.level_count = len(self.level_dimensions)
        self.width, self.height = self.level_dimensions[0]
        self.properties = self._reader.properties

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (1% tolerance):
        reading from it and shrinking never upsamples, so no detail is invented."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01:
                best = level
        return best

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """uint8 [height, width, 3] of a region, top-left (x, y) in level-0 pixels, size in
        ``level`` pixels; background (outside the scan) white."""
        return self._reader.read(int(x), int(y), int(level), int(width), int(height))

    def read_tile(
        self, x: int, y: int, size_level0: int, out_size: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """One square tile: level-0 top-left (x, y) and side ``size_level0``, as ``out_size`` px
        read from the best level and resized (area filter); written into ``out`` when given
        (one row of a batch, filled without a copy of its own)."""
        downsample = size_level0 / out_size
        level = self.best_level(downsample)
        side = max(1, round(size_level0 / self.level_downsamples[level]))
        region = self.read_region(x, y, level, side, side)
        return _into(_resize(region, (out_size, out_size)), out)

    def thumbnail(self, downsample: float) -> tuple[np.ndarray, tuple[float, float]]:
        """The whole slide shrunk by about ``downsample``, and the exact per-axis factors that
        map thumbnail pixels to level 0 (x0 = x_thumb * downsample_x)."""
        size = (max(1, round(self.width / downsample)), max(1, round(self.height / downsample)))
        level = self.best_level(downsample)
        lw, lh = self.level_dimensions[level]
        if lw * lh <= THUMBNAIL_READ_PIXELS:
            rgb = self.read_region(0, 0, level, lw, lh)
        else:  # a big level (a slide without a pyramid): shrink it strip by strip
            rgb = self._shrink_level(level, int(downsample / self.level_downsamples[level]))
        return _resize(rgb, size), (self.width / size[0], self.height / size[1])

    def _shrink_level(self, level: int, factor: int) -> np.ndarray:
        """Block-mean a whole level by an integer ``factor``, reading bounded strips."""
        factor = max(1, factor)
        lw, lh = self.level_dimensions[level]
        width = lw // factor * factor
        rows = max(factor, THUMBNAIL_READ_PIXELS // lw // factor * factor)
        ds = self.level_downsamples[level]
        strips = []
        for ly in range(0, lh // factor * factor, rows):
            height = min(rows, lh // factor * factor - ly)
            strip = self.read_region(0, round(ly * ds), level, width, height)
            blocks = strip.reshape(height // factor, factor, width // factor, factor, 3)
            strips.append(blocks.mean((1, 3)).round().astype(np.uint8))
        return np.concatenate(strips, axis=0)

    def close(self) -> None:
        self._reader.close()


class PatchFolder(_ClosedOnExit):
    """A folder of pre-cut patches: tile ``i`` is the ``i``-th image file (sorted by name), or,
    once tiled, the ``i``-th of the names the coords file recorded (``tile_names``), so that a
    patch added or removed since does not shift the tiles. Tile ``i`` sits at (x, y) = (i, 0).
    """

    is_patch_folder = True

    def __init__(
        self, path: Path, *, mpp: float | None, tile_names: Sequence[str] | None = None
    ) -> None:
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix.lower() in PATCH_SUFFIXES and not is_temp_file(p)
        )
        if tile_names is not None:
            files = _recorded_patches(path, files, tile_names)
        if not files:
            raise SlideError(
                f"{path}: patch folder holds no image files ({', '.join(PATCH_SUFFIXES)})"
            )
        self.path = path
        self.patch_paths = files
        self.mpp = mpp
        self.mpp_source = "config" if mpp is not None else None
        self.width, self.height = len(files), 1
        first = self.read_patch(0)
        self.patch_height, self.patch_width = first.shape[:2]

    def read_patch(self, index: int) -> np.ndarray:
        """The ``index``-th patch as uint8 [h, w, 3]."""
        from PIL import Image, UnidentifiedImageError

        if not 0 <= index < len(self.patch_paths):
            raise SlideError(
                f"{self.path}: no patch number {index} (the folder holds "
                f"{len(self.patch_paths)}): it changed since it was tiled; tile it again with "
                "`bidistill tile`"
            )
        path = self.patch_paths[index]
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
        except FileNotFoundError as err:
            raise SlideError(
                f"{path}: patch gone since the folder was tiled; tile it again with "
                "`bidistill tile`"
            ) from err
        except (OSError, UnidentifiedImageError) as err:
            raise SlideError(f"{path}: cannot read patch ({err})") from err

    def read_tile(
        self, x: int, y: int, size_level0: int, out_size: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Patch number ``x`` (``y`` and ``size_level0`` are ignored), resized to ``out_size``
        (written into ``out`` when given, as ``WholeSlide.read_tile``)."""
        return _into(_resize(self.read_patch(int(x)), (out_size, out_size)), out)

    def close(self) -> None:
        """Nothing to release (each patch file is opened and closed on read)."""


Slide = WholeSlide | PatchFolder


def _recorded_patches(folder: Path, files: Sequence[Path], names: Sequence[str]) -> list[Path]:
    """The patches named when the folder was tiled, in that order; a patch gone (or a name that
    leaves the folder) is a ``SlideError``, patches added since are left out (and said)."""
    present = {p.name for p in files}
    gone = [n for n in names if n not in present or Path(n).name != n]
    if gone:
        more = f" and {len(gone) - 3} more" if len(gone) > 3 else ""
        raise SlideError(
            f"{folder}: {count(len(gone), 'patch')} listed when the folder was tiled "
            f"{verb(len(gone), 'is', 'are')} gone "
            f"({', '.join(gone[:3])}{more}); the folder changed since it was tiled: tile it "
            "again with `bidistill tile`"
        )
    added = len(present - set(names))
    if added:
        log.warning(
            "%s: %s added since the folder was tiled %s left out (tile it again with "
            "`bidistill tile` to use them)",
            folder,
            count(added, "patch"),
            verb(added, "is", "are"),
        )
    return [folder / n for n in names]


def default_cache_dir() -> Path:
    """Where plain images are converted when no cache folder is given."""
    env = os.environ.get(DEFAULT_CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "bidistill" / "slides"


def open_slide(
    path: str | Path,
    mpp: float | None = None,
    *,
    cache_dir: str | Path | None = None,
    tile_names: Sequence[str] | None = None,
) -> Slide:
    """Open any slide: a pyramidal WSI, a plain image of any size, or a folder of patches.

    ``mpp`` is used when the file's metadata has none. The first open of a plain image writes its
    cache TIFF into ``cache_dir`` (default ``default_cache_dir()``; seconds to a minute for a
    BCNB-sized JPEG). ``tile_names``: a patch folder's recorded file names (tile i is file i).
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: slide file not found")
    if path.is_dir():
        return PatchFolder(path, mpp=mpp, tile_names=tile_names)
    suffix = path.suffix.lower()
    if suffix not in SLIDE_SUFFIXES:
        raise SlideError(
            f"{path}: unsupported slide format '{suffix}'; supported: {', '.join(SLIDE_SUFFIXES)}"
            " or a folder of patches"
        )
    vendor = _detect_format(path)
    if vendor is not None:
        slide = WholeSlide(path, path, mpp=None, mpp_source=None)
        slide.mpp, slide.mpp_source = _choose_mpp(path, _openslide_mpp(slide.properties, path), mpp)
        return slide
    if suffix in OPENSLIDE_SUFFIXES and suffix not in PLAIN_SUFFIXES:
        # .svs, .ndpi, ...: OpenSlide is the only reader, so say what it made of the file.
        raise SlideError(_openslide_refusal(path))
    cache_path, file_mpp = _plain_to_cache(path, Path(cache_dir or default_cache_dir()), mpp)
    value, source = _choose_mpp(path, file_mpp, mpp)
    return WholeSlide(path, cache_path, mpp=value, mpp_source=source, reader="vips")


def require_mpp(slide: Slide) -> float:
    """The slide's MPP, or an error that says how to give it (for magnification-based tiling)."""
    if slide.mpp is None:
        raise SlideError(
            f"{slide.path}: the file has no microns-per-pixel in its metadata, so it cannot be "
            "tiled at a target MPP. Give it in the config: `slides.mpp` (every slide of the "
            "cohort), `slides.mpp_column` (a per-slide column of the cohort table), or set "
            "`tiling.mpp: null` to tile at level 0"
        )
    return slide.mpp


def metadata_mpp(path: str | Path) -> float | None:
    """The MPP a slide file states in its metadata, read from its header only (no pixels, no
    conversion of plain images): what the checks before tiling ask. None when the file states
    none, is a patch folder, or cannot be read (tiling then names the file and the reason)."""
    path = Path(path)
    if path.is_dir() or not path.is_file():
        return None
    if _detect_format(path) is not None:
        import openslide

        try:
            with openslide.OpenSlide(str(path)) as slide:
                return _openslide_mpp(dict(slide.properties), path)
        except openslide.OpenSlideError:
            return None
    import pyvips

    try:
        return _plain_mpp(pyvips.Image.new_from_file(str(path), access="sequential"), path)
    except pyvips.Error:
        return None


# OpenSlide formats whose levels are plain tiled TIFF pages that libvips decodes itself.
FAST_TIFF_VENDORS = ("aperio", "generic-tiff")
READER_ENV = "BIDISTILL_SLIDE_READER"  # "openslide" turns the libvips fast path off


def _fast_tiff_reader(path: Path, read_path: Path) -> _VipsPyramidReader | None:
    """libvips on the TIFF pages of an SVS or generic tiled TIFF, when it gives OpenSlide's
    pixels; None (use OpenSlide) otherwise.

    Each level is matched to the tiled page of exactly its size and a patch at the centre of
    level 0 is compared, so a file that libvips reads differently never goes through it. One
    difference remains by design: a region whose origin falls between two pixels of a coarser
    level starts at the pixel below (OpenSlide shifts it by the fraction); tiles of a tiling grid
    sit on the level's pixels, where both agree.
    """
    if os.environ.get(READER_ENV, "").lower() == "openslide":
        return None
    if _detect_format(read_path) not in FAST_TIFF_VENDORS:
        return None
    reference = _OpenSlideReader(path, read_path)
    try:
        pages = _tiff_pages_of_levels(read_path, reference.level_dimensions)
        if pages is None:
            return None
        fast = _VipsPyramidReader(path, read_path, pages)
        w, h = reference.level_dimensions[0]
        x, y, side = max(0, w // 2 - 64), max(0, h // 2 - 64), min(128, w, h)
        ours, theirs = fast.read(x, y, 0, side, side), reference.read(x, y, 0, side, side)
        # Both decode with libjpeg-turbo; allow a one-level difference of rounding.
        if np.abs(ours.astype(np.int16) - theirs).max() > 1:
            log.info("%s: libvips and OpenSlide disagree on its pixels; using OpenSlide", path)
            return None
    except SlideError:
        return None
    finally:
        reference.close()
    fast.properties = reference.properties
    return fast


def _tiff_pages_of_levels(
    read_path: Path, level_dimensions: Sequence[tuple[int, int]]
) -> list[int] | None:
    """The tiled TIFF page of each level (matched by size), or None when one has none."""
    import pyvips

    try:
        sizes = {}
        for i, page in enumerate(_tiff_pages(read_path)):
            if "tile-width" in page.get_fields() and page.bands == 3:
                sizes.setdefault((page.width, page.height), i)
    except pyvips.Error:
        return None
    pages = [sizes.get(tuple(dims)) for dims in level_dimensions]
    return None if any(p is None for p in pages) else pages


def _tiff_pages(read_path: Path) -> list:
    """Every page of a TIFF, as pyvips images (raises ``pyvips.Error``)."""
    import pyvips

    first = pyvips.Image.tiffload(str(read_path), page=0)
    n_pages = first.get("n-pages") if "n-pages" in first.get_fields() else 1
    return [first] + [pyvips.Image.tiffload(str(read_path), page=i) for i in range(1, n_pages)]


def _detect_format(path: Path) -> str | None:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError):
        return None


def _openslide_refusal(path: Path) -> str:
    import openslide

    try:
        openslide.OpenSlide(str(path)).close()
    except openslide.OpenSlideUnsupportedFormatError:
        return f"{path}: not a slide OpenSlide can read (unsupported or damaged file)"
    except (openslide.OpenSlideError, OSError) as err:
        return f"{path}: not a readable slide ({err})"
    return f"{path}: OpenSlide did not recognise the file's format"


def _openslide_mpp(props: dict[str, str], path: Path) -> float | None:
    try:
        mpp_x = float(props["openslide.mpp-x"])
        mpp_y = float(props.get("openslide.mpp-y", mpp_x))
    except (KeyError, ValueError):
        return None
    if not (mpp_x > 0 and mpp_y > 0):
        return None
    if abs(mpp_x - mpp_y) / mpp_x > 0.01:
        log.warning("%s: non-square pixels (mpp %.4f x %.4f); using x", path, mpp_x, mpp_y)
    return mpp_x


def _choose_mpp(
    path: Path, file_mpp: float | None, config_mpp: float | None
) -> tuple[float | None, str | None]:
    if file_mpp is not None:
        if config_mpp is not None and abs(file_mpp - config_mpp) / file_mpp > 0.05:
            log.warning(
                "%s: the file says %.4f um/px, the config %.4f; using the file's value",
                path,
                file_mpp,
                config_mpp,
            )
        return file_mpp, "file"
    if config_mpp is not None:
        return float(config_mpp), "config"
    return None, None


def _cache_name(path: Path) -> str:
    """A cache file name that changes when the source file is replaced or edited."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.tif"


def _plain_mpp(image, path: Path) -> float | None:
    """MPP from a plain image's resolution tags, when they look like a microscope's."""
    try:
        xres = float(image.get("xres"))  # libvips: pixels per millimetre
    except Exception:
        return None
    if xres <= 0:
        return None
    mpp = 1000.0 / xres
    if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        return mpp
    return None


def _plain_to_cache(
    path: Path, cache_dir: Path, config_mpp: float | None
) -> tuple[Path, float | None]:
    """Convert a plain image, streaming, into a tiled pyramidal TIFF (once); the TIFF's path
    and the MPP of the source's metadata (or None)."""
    import pyvips

    try:
        # fail_on="truncated": libvips only warns about a truncated JPEG by default and would
        # fill the missing rows with grey; a damaged slide must be an error instead.
        image = pyvips.Image.new_from_file(str(path), access="sequential", fail_on="truncated")
    except pyvips.Error as err:
        raise SlideError(f"{path}: not a readable image ({_vips_reason(err)})") from err
    file_mpp = _plain_mpp(image, path)
    target = cache_dir / _cache_name(path)
    if target.is_file():
        return target, file_mpp
    image = _as_srgb(image, path)
    mpp = file_mpp or config_mpp
    # Resolution tags in pixels per mm (libvips' unit) with unit cm: OpenSlide reports the MPP.
    res = {"xres": 1000.0 / mpp, "yres": 1000.0 / mpp, "resunit": "cm"} if mpp else {}
    try:
        with atomic_path(target) as tmp:
            image.tiffsave(
                str(tmp),
                tile=True,
                tile_width=CACHE_TILE,
                tile_height=CACHE_TILE,
                pyramid=True,
                compression="jpeg",
                Q=CACHE_QUALITY,
                bigtiff=True,
                **res,
            )
    except pyvips.Error as err:
        raise SlideError(f"{path}: cannot decode image ({_vips_reason(err)})") from err
    log.info("%s: converted to %s", path, target)
    return target, file_mpp


def _as_srgb(image, path: Path):
    """Flatten alpha onto white, turn grey or CMYK into sRGB; refuse anything but 8 bits."""
    if image.format != "uchar":
        raise SlideError(f"{path}: expected an 8-bit image, got {image.format} pixels")
    if image.hasalpha():
        image = image.flatten(background=[255] * (image.bands - 1))
    if image.interpretation != "srgb":
        image = image.colourspace("srgb")
    if image.bands != 3:
        raise SlideError(f"{path}: expected an RGB or grey image, got {image.bands} bands")
    return image


def _vips_reason(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return "; ".join(lines[:3]) or type(err).__name__
