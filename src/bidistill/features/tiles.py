"""Reading tiles for extraction, in data-loader worker processes, one slide's batches at a time.

A slide that cannot be read yields one ``TileChunk`` carrying its error, so the main process
decides whether the stage goes on. Workers decode straight into shared-memory batches
(``BatchSlots``) and hand over only where a batch lies: a copy, pickled pixels and fresh pages
for every batch cost a worker more than a third of its CPU (``benchmarks/bench_tiling.py``).
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import h5py
import torch

from bidistill.errors import ConfigError
from bidistill.slide_stages import describe_failure

PREFETCH = 4  # batches each worker reads ahead


class TileJob(Protocol):
    """What reading needs of a slide (``ExtractionJob`` has it)."""

    slide_path: Path
    coords_path: Path
    mpp: float | None


class SlotRef(NamedTuple):
    """Where a worker left a batch: its slot and the batch's shape [b, H, W, 3]."""

    worker: int
    index: int
    shape: tuple[int, int, int, int]


class TileChunk(NamedTuple):
    """What a worker hands over: one batch of one slide's tiles (from tile ``start`` of
    ``total``), or that slide's error. ``pixels`` is None for an error or a slide without tiles,
    and while the batch travels in a slot (``load_tiles`` puts it in place)."""

    job: int
    start: int
    total: int
    pixels: torch.Tensor | None
    error: str | None
    slot: SlotRef | None = None


class BatchSlots:
    """Batches of shared memory that workers decode tiles into and the main process reads.

    Allocated before the workers start, so every worker maps the same memory, and reused, so
    its pages are faulted in once. Each worker owns ``per_worker`` slots and fills them in
    turn; its semaphore counts those the main process is done with. The main process takes a
    worker's batches in the order the worker made them (the data loader's order), so the slot
    freed is always that worker's oldest and the next one it fills.
    """

    def __init__(self, workers: int, per_worker: int, batch_size: int, side: int) -> None:
        self.per_worker = per_worker
        self.capacity = batch_size * side * side * 3
        self.buffers = torch.empty((workers, per_worker, self.capacity), dtype=torch.uint8)
        try:
            self.buffers.share_memory_()
        except RuntimeError as err:  # e.g. a container's small /dev/shm
            raise ConfigError(
                f"cannot allocate {self.buffers.numel() / 2**20:.0f} MiB of shared memory for "
                f"{workers} data-loader workers ({err}); lower features.num_workers or "
                "features.batch_size, or give the container more (docker run --shm-size=8g)"
            ) from err
        self.free = [multiprocessing.Semaphore(per_worker) for _ in range(workers)]
        self.filled = 0  # slots this process filled (each worker counts its own)

    def take(self, worker: int, shape: tuple[int, int, int, int]) -> SlotRef | None:
        """The next slot of ``worker`` once it is free; None when the batch would not fit."""
        if math.prod(shape) > self.capacity:
            return None
        self.free[worker].acquire()
        index = self.filled % self.per_worker
        self.filled += 1
        return SlotRef(worker, index, shape)

    def give_back(self, slot: SlotRef) -> None:
        """Free a slot whose batch was never handed over (reading failed): it is the next to
        fill, so the slots stay in turn."""
        self.filled -= 1
        self.free[slot.worker].release()

    def pixels(self, slot: SlotRef) -> torch.Tensor:
        return self.buffers[slot.worker, slot.index, : math.prod(slot.shape)].view(slot.shape)

    def delivered(self, chunks: Iterable[TileChunk]) -> Iterator[TileChunk]:
        """``chunks`` with their pixels in place; a slot is freed when the next chunk is asked
        for, so a chunk's pixels stay valid until then."""
        try:
            for chunk in chunks:
                if chunk.slot is None:
                    yield chunk
                    continue
                yield chunk._replace(pixels=self.pixels(chunk.slot))
                self.free[chunk.slot.worker].release()
        finally:  # stopped early: no worker may wait for a slot while the loader shuts down
            for free in self.free:
                for _ in range(self.per_worker):
                    free.release()


class TileBatches(torch.utils.data.IterableDataset):
    """Batches of tiles, slide after slide; worker w of W reads slides w, w + W, ... and opens
    them itself: OpenSlide and libvips handles must not cross processes."""

    def __init__(
        self,
        jobs: Sequence[TileJob],
        batch_size: int,
        cache_dir: Path,
        slots: BatchSlots | None = None,
    ) -> None:
        self.jobs = list(jobs)
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.slots = slots

    def __iter__(self) -> Iterator[TileChunk]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index in range(worker, len(self.jobs), workers):
            yield from self._slide_chunks(index, worker)

    def _slide_chunks(self, index: int, worker: int) -> Iterator[TileChunk]:
        from bidistill.slides import open_slide, read_coords

        job = self.jobs[index]
        start, slot = 0, None
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
                    shape = (len(batch), size, size, 3)
                    slot = self.slots.take(worker, shape) if self.slots else None
                    # Decoded into its slot, or a new tensor (no slots, or too big for one).
                    pixels = (
                        self.slots.pixels(slot) if slot else torch.empty(shape, dtype=torch.uint8)
                    )
                    for tile, (x, y) in zip(pixels.numpy(), batch.tolist(), strict=True):
                        slide.read_tile(x, y, size0, size, out=tile)
                    yield TileChunk(index, start, total, None if slot else pixels, None, slot)
                    slot = None  # handed over
        except Exception as err:  # reported per slide; the main process decides what follows
            if slot is not None:
                self.slots.give_back(slot)
            yield TileChunk(index, start, 0, None, describe_failure(err, job.slide_path))


def load_tiles(
    jobs: Sequence[TileJob], *, batch_size: int, cache_dir: Path, num_workers: int
) -> Iterator[TileChunk]:
    """Every job's tiles in batches of ``batch_size``, slide after slide, read by
    ``num_workers`` processes (0: this one).

    A chunk's pixels are valid until the next chunk is asked for: its memory is then reused.
    """
    if num_workers == 0:
        yield from TileBatches(jobs, batch_size, cache_dir)
        return
    # One slot per batch a worker reads ahead, and one for the batch being encoded.
    side = max((coords_header(job.coords_path)[1] for job in jobs), default=0)
    slots = BatchSlots(num_workers, PREFETCH + 1, batch_size, side)
    loader = torch.utils.data.DataLoader(
        TileBatches(jobs, batch_size, cache_dir, slots),
        batch_size=None,  # the dataset yields whole batches
        num_workers=num_workers,
        worker_init_fn=init_reader_worker,
        prefetch_factor=PREFETCH,
        # In order (the default): a worker's slots come back in the order it filled them.
    )
    yield from slots.delivered(loader)


def coords_header(path: Path) -> tuple[int, int]:
    """(tiles, tile side) of a coords file, from its header; (0, 0) when it cannot be read (the
    worker reports it)."""
    try:
        with h5py.File(path, "r") as h5:
            return int(h5["coords"].shape[0]), int(h5.attrs["patch_size"])
    except (OSError, KeyError, ValueError, TypeError):
        return 0, 0


def init_reader_worker(_: int) -> None:
    # One libvips thread per worker: the workers are the parallelism.
    os.environ["VIPS_CONCURRENCY"] = "1"
    try:
        import pyvips
    except (ImportError, OSError):
        return
    # Drop the operations libvips cached in the parent process: their open files were inherited
    # with the parent's file offsets, which two workers reading one slide would share (each
    # would get bytes the other asked for). The cache itself stays on: without it a worker read
    # tiles of a pyramidal TIFF a quarter slower (``benchmarks/bench_tiling.py``).
    bound = pyvips.cache_get_max()
    pyvips.cache_set_max(0)
    pyvips.cache_set_max(bound)
