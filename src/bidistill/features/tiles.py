"""Reading tiles for extraction, in data-loader worker processes.

``TileBatches`` yields batches of one slide's tiles at a time (uint8, as decoded), slide after
slide, each worker taking its own slides and opening them itself: OpenSlide and libvips handles
must not cross processes. A slide that cannot be read yields one ``TileChunk`` carrying its error
instead of stopping the loader, so the main process decides whether the stage goes on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch

from bidistill.runner import describe_failure


class TileJob(Protocol):
    """What reading needs of a slide (``ExtractionJob`` has it)."""

    slide_path: Path
    coords_path: Path
    mpp: float | None


class TileChunk(NamedTuple):
    """What a worker hands over: one batch of one slide's tiles, or that slide's error.

    ``start`` is the index of the first tile in the slide, ``total`` the slide's tile count,
    ``pixels`` uint8 [b, H, W, 3] (None for an error or a slide without tiles).
    """

    job: int
    start: int
    total: int
    pixels: torch.Tensor | None
    error: str | None


class TileBatches(torch.utils.data.IterableDataset):
    """Batches of tiles, slide after slide; worker w of W reads slides w, w + W, ...

    Each worker opens its own slides: OpenSlide and libvips handles must not cross processes.
    """

    def __init__(self, jobs: Sequence[TileJob], batch_size: int, cache_dir: Path) -> None:
        self.jobs = list(jobs)
        self.batch_size = batch_size
        self.cache_dir = cache_dir

    def __iter__(self) -> Iterator[TileChunk]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index in range(worker, len(self.jobs), workers):
            yield from self._slide_chunks(index)

    def _slide_chunks(self, index: int) -> Iterator[TileChunk]:
        from bidistill.slides import open_slide, read_coords

        job = self.jobs[index]
        start = 0
        try:
            tiles = read_coords(job.coords_path)
            total = len(tiles.coords)
            if total == 0:
                yield TileChunk(index, 0, 0, None, None)
                return
            size0, size = tiles.patch_size_level0, tiles.patch_size
            # A patch folder's tiles are the files named when it was tiled, not as it is now.
            with open_slide(
                job.slide_path, job.mpp, cache_dir=self.cache_dir, tile_names=tiles.paths
            ) as slide:
                for start in range(0, total, self.batch_size):
                    batch = tiles.coords[start : start + self.batch_size]
                    pixels = np.stack([slide.read_tile(x, y, size0, size) for x, y in batch])
                    yield TileChunk(index, start, total, torch.from_numpy(pixels), None)
        except Exception as err:  # reported per slide; the main process decides what follows
            yield TileChunk(index, start, 0, None, describe_failure(err, job.slide_path))


def init_reader_worker(_: int) -> None:
    # One libvips thread per worker: the workers are the parallelism.
    os.environ["VIPS_CONCURRENCY"] = "1"
    try:
        import pyvips

        pyvips.cache_set_max(0)  # tiles are read once; caching them would only cost memory
    except (ImportError, OSError):
        pass
