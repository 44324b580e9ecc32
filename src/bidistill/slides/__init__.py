"""Slides in, tile coordinates out: reading any slide, masks, tiling and QC images."""

from bidistill.slides.coords import (
    CoordsFile,
    CoordsFileError,
    coords_path,
    read_coords,
    write_coords,
)
from bidistill.slides.masks import Annotations, load_annotations, rasterize, tissue_mask
from bidistill.slides.reader import PatchFolder, Slide, WholeSlide, open_slide, require_mpp
from bidistill.slides.stage import (
    SlideJob,
    jobs_from_config,
    slide_cache_dir,
    tile_cohort,
    tile_from_config,
)
from bidistill.slides.tiling import SlideTiling, TileSpec, tile_slide

__all__ = [
    "Annotations",
    "CoordsFile",
    "CoordsFileError",
    "PatchFolder",
    "Slide",
    "SlideJob",
    "SlideTiling",
    "TileSpec",
    "WholeSlide",
    "coords_path",
    "jobs_from_config",
    "load_annotations",
    "open_slide",
    "rasterize",
    "read_coords",
    "require_mpp",
    "slide_cache_dir",
    "tile_cohort",
    "tile_from_config",
    "tile_slide",
    "tissue_mask",
    "write_coords",
]
