"""End-to-end mode's bags: tiles drawn from each patient's slides, read and decoded in loader
workers that open their own slides (OpenSlide and libvips handles must not cross processes),
collated into padded uint8 ``[B, N, 3, H, W]`` batches; the patch encoder normalises on device.

Which tiles go into which bag is decided in the main process from the seed alone (never from
the worker or process that reads them), so that runs repeat exactly with any number of
processes: training reshuffles each patient's tiles per epoch (every tile once per epoch, as
the BCNB authors' code); validation and prediction use a fixed shuffle per (seed, patient id),
so a patient's bags do not depend on the patients predicted with it. A patient without tiles
gets one empty bag."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bidistill.config import AugmentConfig, ExperimentConfig
from bidistill.errors import ConfigError, SlideError
from bidistill.training.data import clinical_tensors, collate_bags

MAX_OPEN_SLIDES = 8  # per worker process: enough for bags that span a patient's slides


# --- where the tiles are ------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideTiles:
    """One slide's tiles: its file (or patch folder), its coords file and the tile geometry."""

    slide_id: str
    slide_path: Path
    coords_path: Path
    coords: np.ndarray  # int64 [n, 2], level-0 x, y (patch folders: the patch index, 0)
    patch_size: int  # pixels of a tile as read
    patch_size_level0: int
    mpp: float | None  # the slide's MPP for files that lack it (the config's)
    tile_mpp: float | None  # the tiles' MPP (the coords file's ``mpp``)
    names: tuple[str, ...] | None = None  # patch folders: the file of each tile, as tiled


class TileIndex:
    """Every patient's tiles: patient i's are its slides' tiles, in slide order (``patients``:
    per patient, the indices of its slides in ``slides``)."""

    def __init__(self, slides: Sequence[SlideTiles], patients: Sequence[Sequence[int]]):
        self.slides = list(slides)
        self.patients = [list(p) for p in patients]
        self._starts = [
            np.cumsum([0] + [len(self.slides[s].coords) for s in slides_of])
            for slides_of in self.patients
        ]
        sizes = {s.patch_size for s in self.slides}
        if len(sizes) > 1:
            raise SlideError(
                f"the slides were tiled at different patch sizes {sorted(sizes)} (e.g. "
                f"{self.slides[0].coords_path}); tile them again with one `tiling` section"
            )
        self.patch_size = sizes.pop() if sizes else 0

    @classmethod
    def of(cls, slides_per_patient: Sequence[Sequence[str]], read) -> TileIndex:
        """The patients' tiles, each distinct slide read once (``read(slide_id)``)."""
        order: dict[str, int] = {}
        slides: list[SlideTiles] = []
        for slide_id in (s for ids in slides_per_patient for s in ids):
            if slide_id not in order:
                order[slide_id] = len(slides)
                slides.append(read(slide_id))
        return cls(slides, [[order[s] for s in ids] for ids in slides_per_patient])

    def __len__(self) -> int:
        return len(self.patients)

    def n_tiles(self, patient: int) -> int:
        return int(self._starts[patient][-1])

    def lengths(self, patient: int) -> list[int]:
        """Tiles per slide of the patient, in slide order."""
        return [len(self.slides[s].coords) for s in self.patients[patient]]

    def locate(self, patient: int, tiles: Sequence[int]) -> list[tuple[int, int]]:
        """(slide index, tile index in the slide) of the patient's tiles ``tiles``."""
        starts = self._starts[patient]
        which = np.searchsorted(starts, np.asarray(tiles), side="right") - 1
        slides = self.patients[patient]
        return [(slides[w], int(t - starts[w])) for w, t in zip(which, tiles)]


def read_slide_tiles(
    slide_id: str, slide_path: Path, coords_file: Path, mpp: float | None
) -> SlideTiles:
    """A slide's tiles from its coords file (``bidistill tile``)."""
    from bidistill.slides import read_coords

    if not coords_file.is_file():
        raise SlideError(
            f"{coords_file}: no tile coordinates for slide '{slide_id}'; end-to-end training "
            "reads the tiles of the tiling stage: run `bidistill tile CONFIG` first"
        )
    tiles = read_coords(coords_file)
    tile_mpp = tiles.attrs.get("mpp")
    return SlideTiles(
        slide_id=slide_id,
        slide_path=Path(slide_path),
        coords_path=Path(coords_file),
        coords=tiles.coords,
        patch_size=tiles.patch_size,
        patch_size_level0=tiles.patch_size_level0,
        mpp=mpp,
        tile_mpp=None if tile_mpp is None else float(tile_mpp),
        names=None if tiles.paths is None else tuple(tiles.paths),
    )


def tile_index_from_config(
    config: ExperimentConfig, slides_per_patient: Sequence[Sequence[str]]
) -> TileIndex:
    """The tiles of the patients' slides, with the config's slide files and coords files."""
    from bidistill.slides import coords_path, jobs_from_config

    if not any(slides_per_patient):  # a method that reads no slides (clinical-only)
        return TileIndex([], [[] for _ in slides_per_patient])
    jobs, missing = jobs_from_config(config)
    by_id = {job.slide_id: job for job in jobs}
    wanted = [s for slides in slides_per_patient for s in slides]
    absent = [s for s in wanted if s not in by_id]
    if absent:
        reason = missing.get(absent[0], f"slide '{absent[0]}' is not in the cohort")
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise SlideError(f"{reason}{more}")

    def read(slide_id: str) -> SlideTiles:
        job = by_id[slide_id]
        coords_file = coords_path(config.tiling.coords_dir, slide_id)
        return read_slide_tiles(slide_id, job.path, coords_file, job.mpp)

    return TileIndex.of(slides_per_patient, read)


# --- which tiles go into which bag --------------------------------------------------------------


@dataclass(frozen=True)
class BagSpec:
    """One bag: a patient (its row in the dataset) and some of its tiles."""

    item: int
    tiles: tuple[int, ...]  # indices into the patient's tiles (empty: a bag without tiles)
    augment_seed: int | None = None  # None: no augmentation


def patient_key(patient_id: str) -> int:
    """A stable number per patient id (the same in every process and Python run)."""
    return zlib.crc32(str(patient_id).encode("utf-8"))


def _chunks(order: np.ndarray, bag_size: int, limit: int | None) -> list[tuple[int, ...]]:
    bags = [tuple(int(t) for t in order[i : i + bag_size]) for i in range(0, len(order), bag_size)]
    bags = bags or [()]  # a patient without tiles: one empty bag
    return bags[:limit] if limit is not None else bags


def prediction_bags(
    n_tiles: int, patient_id: str, *, seed: int, bag_size: int, limit: int | None
) -> list[tuple[int, ...]]:
    """A patient's bags for validation and prediction: a fixed shuffle of its tiles in bags."""
    rng = np.random.default_rng([seed, patient_key(patient_id), 1])
    return _chunks(rng.permutation(n_tiles), bag_size, limit)


def training_bags(
    n_tiles: Sequence[int],
    patient_ids: Sequence[str],
    *,
    seed: int,
    epoch: int,
    bag_size: int,
    limit: int | None,
    augment: bool,
) -> list[BagSpec]:
    """One epoch's training bags of every patient, shuffled, each with its augmentation seed."""
    specs = []
    for item, (n, pid) in enumerate(zip(n_tiles, patient_ids)):
        rng = np.random.default_rng([seed, epoch, patient_key(pid), 2])
        for bag in _chunks(rng.permutation(n), bag_size, limit):
            aug = int(rng.integers(2**62)) if augment else None
            specs.append(BagSpec(item, bag, aug))
    order = np.random.default_rng([seed, epoch, 3]).permutation(len(specs))
    return [specs[i] for i in order]


# --- reading, augmenting, collating -------------------------------------------------------------


def augment_tile(tile: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """A random flip / rotation / colour jitter of one uint8 tile [H, W, 3] → uint8 [3, H, W]."""
    if cfg.flip:
        if rng.random() < 0.5:
            tile = tile[:, ::-1]
        if rng.random() < 0.5:
            tile = tile[::-1]
    if cfg.rotate:
        tile = np.rot90(tile, int(rng.integers(4)))
    image = torch.from_numpy(np.array(tile)).permute(2, 0, 1)  # a writable copy
    if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
        from torchvision.transforms.v2 import functional as tvf

        if cfg.brightness:
            image = tvf.adjust_brightness(image, _factor(rng, cfg.brightness))
        if cfg.contrast:
            image = tvf.adjust_contrast(image, _factor(rng, cfg.contrast))
        if cfg.saturation:
            image = tvf.adjust_saturation(image, _factor(rng, cfg.saturation))
        if cfg.hue:
            image = tvf.adjust_hue(image, float(rng.uniform(-cfg.hue, cfg.hue)))
    return image.contiguous()


def _factor(rng: np.random.Generator, amount: float) -> float:
    return float(rng.uniform(1 - amount, 1 + amount))


class TileBags(torch.utils.data.Dataset):
    """Bags of decoded tiles; an item is a ``BagSpec`` (the sampler decides the bags). Row i of
    the clinical arrays is patient i of ``tiles``; ``augment`` applies to bags with an
    ``augment_seed``; ``cache_dir``: the tiling stage's plain-image cache."""

    def __init__(
        self,
        tiles: TileIndex,
        clinical: np.ndarray,
        clinical_valid: np.ndarray,
        clinical_present: np.ndarray,
        labels: np.ndarray | None,
        *,
        augment: AugmentConfig | None,
        cache_dir: Path | None,
    ) -> None:
        self.tiles = tiles
        rows = clinical_tensors(clinical, clinical_valid, clinical_present, labels)
        self.clinical, self.clinical_valid, self.clinical_present, self.labels = rows
        self.augment = augment
        self.cache_dir = cache_dir
        self._open: dict[int, object] = {}  # slide index → open slide, per process

    def __len__(self) -> int:
        return len(self.clinical)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = {}  # slide handles never cross processes
        return state

    def __getitem__(self, spec: BagSpec) -> dict:
        size = self.tiles.patch_size or 1
        pixels = torch.zeros(len(spec.tiles), 3, size, size, dtype=torch.uint8)
        rng = np.random.default_rng(spec.augment_seed) if spec.augment_seed is not None else None
        where = self.tiles.locate(spec.item, spec.tiles) if spec.tiles else []
        for k, (slide, tile) in enumerate(where):
            image = self._read(slide, tile)
            if rng is not None and self.augment is not None:
                pixels[k] = augment_tile(image, rng, self.augment)
            else:
                pixels[k] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        i = spec.item
        return {
            "pixels": pixels,
            "clinical": self.clinical[i],
            "clinical_valid": self.clinical_valid[i],
            "clinical_present": self.clinical_present[i],
            "label": None if self.labels is None else self.labels[i],
        }

    def _read(self, slide_index: int, tile: int) -> np.ndarray:
        info = self.tiles.slides[slide_index]
        x, y = info.coords[tile]
        return self._slide(slide_index).read_tile(x, y, info.patch_size_level0, info.patch_size)

    def _slide(self, index: int):
        slide = self._open.pop(index, None)  # re-inserted last: the most recently used
        if slide is None:
            from bidistill.slides import open_slide

            info = self.tiles.slides[index]
            slide = open_slide(
                info.slide_path, info.mpp, cache_dir=self.cache_dir, tile_names=info.names
            )
            if len(self._open) >= MAX_OPEN_SLIDES:
                oldest = next(iter(self._open))
                self._open.pop(oldest).close()
        self._open[index] = slide
        return slide

    def close(self) -> None:
        for slide in self._open.values():
            slide.close()
        self._open.clear()


collate_tile_bags = functools.partial(collate_bags, key="pixels", dtype=torch.uint8)


class PlanSampler(torch.utils.data.Sampler[list[BagSpec]]):
    """Yields the batches of bags set by ``set_plan`` (so that one loader, with its worker
    processes and their open slides, serves every epoch)."""

    def __init__(self) -> None:
        self.batches: list[list[BagSpec]] = []

    def set_plan(self, batches: list[list[BagSpec]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[BagSpec]]:
        return iter(list(self.batches))


def tile_loader(dataset: TileBags, *, workers: int, device: torch.device):
    """A loader over ``dataset`` whose batches are set per pass (``loader.batch_sampler``)."""
    from bidistill.features.tiles import init_reader_worker

    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=PlanSampler(),
        collate_fn=collate_tile_bags,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=init_reader_worker if workers else None,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )


def check_bag_settings(batch_size: int, micro_batch: int) -> None:
    if batch_size % micro_batch:
        raise ConfigError(
            f"training.batch_size ({batch_size} bags per step) must be a multiple of "
            f"training.end_to_end.micro_batch ({micro_batch} bags per forward pass)"
        )
