"""Slides in, tile coordinates out: reading any slide, masks, tiling and QC images."""

from bidistill.slides.coords import CoordsFileError, coords_path, read_coords
from bidistill.slides.reader import PatchFolder, WholeSlide, open_slide, require_mpp
from bidistill.slides.stage import (
    SlideJob,
    jobs_from_config,
    slide_cache_dir,
    tile_cohort,
    tile_from_config,
)
from bidistill.slides.tiling import tile_slide

__all__ = [
    "CoordsFileError",
    "PatchFolder",
    "SlideJob",
    "WholeSlide",
    "coords_path",
    "jobs_from_config",
    "open_slide",
    "read_coords",
    "require_mpp",
    "slide_cache_dir",
    "tile_cohort",
    "tile_from_config",
    "tile_slide",
]
