"""The tiling stage over a cohort: every slide, in parallel over processes, resumable.

A slide is done when its coords file exists (coords files are written atomically and last, after
the QC image), so a rerun after a kill tiles only what is missing. Failures are per slide: by
default the first one stops the run with its message; with ``skip_errors`` the run goes on and
ends with a summary of the slides that failed.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from bidistill._io import write_json
from bidistill._paths import lookup_named
from bidistill.config import ExperimentConfig, TilingConfig
from bidistill.errors import BidistillError, ConfigError, SlideError
from bidistill.slides.coords import coords_path
from bidistill.slides.qc import qc_path, write_patch_folder_qc, write_tiling_qc
from bidistill.slides.reader import SLIDE_SUFFIXES, PatchFolder, open_slide
from bidistill.slides.tiling import tile_slide, write_patch_folder_coords, write_slide_tiling

log = logging.getLogger(__name__)

ANNOTATION_SUFFIXES = (".json", ".geojson")


@dataclass(frozen=True)
class SlideJob:
    """One slide to tile: its id, its file (or patch folder), its MPP from the config, if any,
    and its annotation file, if any."""

    slide_id: str
    path: Path
    mpp: float | None = None
    annotations: Path | None = None


@dataclass
class TilingSummary:
    """What a tiling run did: tiles kept per slide tiled now, slides already done, failures."""

    tiled: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def empty(self) -> list[str]:
        """Slides tiled now that kept no tile (worth a look at their QC image)."""
        return [s for s, n in self.tiled.items() if n == 0]

    def to_dict(self) -> dict:
        return {"tiled": self.tiled, "skipped": self.skipped, "failed": self.failed}


# --- finding files ------------------------------------------------------------------------------


def index_slide_files(slides_dir: Path) -> dict[str, Path]:
    """Map slide id → file, for ``<slide_id>.<supported ext>`` files and ``<slide_id>/`` folders.

    A file wins over a folder of the same name (MIRAX keeps its data in a folder beside the
    ``.mrxs``).
    """
    if not slides_dir.is_dir():
        raise ConfigError(f"{slides_dir}: slides folder not found (`slides.dir` in the config)")
    files: dict[str, Path] = {}
    folders: dict[str, Path] = {}
    for entry in sorted(slides_dir.iterdir()):
        if entry.is_dir():
            folders[entry.name] = entry
        elif entry.suffix.lower() in SLIDE_SUFFIXES:
            files.setdefault(entry.stem, entry)
    return {**folders, **files}


def locate_annotations(annotations_dir: Path | None, slide_id: str) -> Path | None:
    if annotations_dir is None:
        return None
    for suffix in ANNOTATION_SUFFIXES:
        candidate = annotations_dir / f"{slide_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def jobs_from_config(config: ExperimentConfig) -> tuple[list[SlideJob], dict[str, str]]:
    """The cohort's slides as jobs, plus the slides whose file was not found (id → reason).

    Raises:
        ConfigError: no ``slides`` section, no slide column in the cohort, or no slides folder.
    """
    from bidistill.cohort import load_cohort

    if config.slides is None:
        raise ConfigError("the config has no `slides` section: set `slides.dir` to tile slides")
    slides_cfg = config.slides
    table = load_cohort(config.cohort, mpp_column=slides_cfg.mpp_column).slides
    if table is None or len(table) == 0 or "slide_id" not in table:
        raise ConfigError(
            "the cohort lists no slides: set `cohort.slide_column` to the table's slide id column"
        )
    files = index_slide_files(slides_cfg.dir)
    jobs: list[SlideJob] = []
    missing: dict[str, str] = {}
    for row in table.itertuples(index=False):
        slide_id = str(row.slide_id)
        path = lookup_named(files, slide_id)  # NFC or NFD file names alike
        if path is None:
            missing[slide_id] = (
                f"{slides_cfg.dir}: no slide file for '{slide_id}' (looked for "
                f"{slide_id}.<{'|'.join(s.lstrip('.') for s in SLIDE_SUFFIXES)}> "
                f"or a folder {slide_id}/)"
            )
            continue
        mpp = getattr(row, "mpp", None)
        mpp = None if mpp is None or (isinstance(mpp, float) and math.isnan(mpp)) else float(mpp)
        jobs.append(
            SlideJob(
                slide_id=slide_id,
                path=path,
                mpp=mpp if mpp is not None else slides_cfg.mpp,
                annotations=locate_annotations(slides_cfg.annotations_dir, slide_id),
            )
        )
    return jobs, missing


# --- one slide ----------------------------------------------------------------------------------


def tile_one(job: SlideJob, tiling: TilingConfig, cache_dir: Path) -> int:
    """Tile one slide and write its QC image and coords file (in that order).

    Returns:
        number of tiles kept.

    Raises:
        SlideError (or another BidistillError): the slide cannot be read or tiled.
    """
    target = coords_path(tiling.coords_dir, job.slide_id)
    with open_slide(job.path, job.mpp, cache_dir=cache_dir) as slide:
        if isinstance(slide, PatchFolder):
            if tiling.qc:
                write_patch_folder_qc(qc_path(tiling.coords_dir, job.slide_id), slide)
            write_patch_folder_coords(target, slide, tiling)
            return len(slide.patch_paths)
        result = tile_slide(slide, tiling, annotations_path=job.annotations)
        if tiling.qc:
            write_tiling_qc(qc_path(tiling.coords_dir, job.slide_id), result)
        write_slide_tiling(target, slide, result)
    if len(result.coords) == 0:
        log.warning("%s: no tile kept (see its QC image)", job.path)
    return len(result.coords)


def _tile_one_safely(
    job: SlideJob, tiling: TilingConfig, cache_dir: Path, skip_errors: bool
) -> tuple[str, int | None, str | None]:
    """Worker entry: (slide id, tiles kept or None, error message or None)."""
    try:
        return job.slide_id, tile_one(job, tiling, cache_dir), None
    except BidistillError as err:
        if not skip_errors:
            raise
        return job.slide_id, None, str(err)
    except Exception as err:  # a damaged file can surface as any library error
        if not skip_errors:
            raise
        return job.slide_id, None, f"{job.path}: {type(err).__name__}: {err}"


# --- the cohort ---------------------------------------------------------------------------------


def tile_cohort(
    jobs: list[SlideJob],
    tiling: TilingConfig,
    *,
    cache_dir: Path | None = None,
    workers: int | None = None,
    skip_errors: bool = False,
    progress: bool = True,
) -> TilingSummary:
    """Tile every slide whose coords file does not exist yet.

    Args:
        jobs: the slides.
        tiling: tile size, mask, filters, output folder.
        cache_dir: where plain images are converted (default ``<coords_dir>/.cache``).
        workers: processes (default ``tiling.workers``); 1 tiles in this process.
        skip_errors: record failures and go on, instead of stopping at the first.
        progress: show a progress bar.

    Returns:
        TilingSummary.

    Raises:
        SlideError (or another BidistillError): the first failure, unless ``skip_errors``.

    Side effects: writes ``<coords_dir>/<slide_id>.h5``, ``<coords_dir>/qc/<slide_id>.png`` and
    ``<coords_dir>/tiling_summary.json``.
    """
    coords_dir = Path(tiling.coords_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else coords_dir / ".cache"
    workers = workers or tiling.workers
    summary = TilingSummary()
    todo = []
    for job in jobs:
        if coords_path(coords_dir, job.slide_id).is_file():
            summary.skipped.append(job.slide_id)
        else:
            todo.append(job)
    with _progress_bar(len(todo), progress) as advance:
        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                _record(summary, _tile_one_safely(job, tiling, cache_dir, skip_errors))
                advance()
        else:
            _run_pool(todo, tiling, cache_dir, workers, skip_errors, summary, advance)
    if todo:
        write_json(coords_dir / "tiling_summary.json", summary.to_dict())
    return summary


def _record(summary: TilingSummary, outcome: tuple[str, int | None, str | None]) -> None:
    slide_id, n_tiles, error = outcome
    if error is not None:
        summary.failed[slide_id] = error
        log.error("%s", error)
    else:
        summary.tiled[slide_id] = int(n_tiles or 0)


def _run_pool(todo, tiling, cache_dir, workers, skip_errors, summary, advance) -> None:
    # spawn, not fork: OpenSlide and libvips keep native state that a fork would share.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        pending: set[Future] = {
            pool.submit(_tile_one_safely, job, tiling, cache_dir, skip_errors) for job in todo
        }
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    _record(summary, future.result())
                    advance()
        except BaseException:
            for future in pending:
                future.cancel()
            raise


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Callable[[], None]]:
    """``with _progress_bar(total, enabled) as advance``: a rich bar over slides."""
    if not enabled or total == 0:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task("tiling slides", total=total)
        yield lambda: bar.advance(task)


def slide_cache_dir(config: ExperimentConfig) -> Path:
    """Where plain images of this experiment are converted: ``slides.cache_dir``, else
    ``<tiling.coords_dir>/.cache``. Later stages (feature extraction, heatmaps) pass it to
    ``open_slide`` so they reuse the conversion instead of redoing it."""
    if config.slides is not None and config.slides.cache_dir is not None:
        return Path(config.slides.cache_dir)
    return Path(config.tiling.coords_dir) / ".cache"


def tile_from_config(
    config: ExperimentConfig, *, workers: int | None = None, skip_errors: bool = False
) -> TilingSummary:
    """Tile the cohort of an experiment config (what `bidistill tile CONFIG` does).

    Raises:
        ConfigError: no slides to tile; SlideError: a slide fails and ``skip_errors`` is off.
    """
    jobs, missing = jobs_from_config(config)
    if missing and not skip_errors:
        first = next(iter(missing.values()))
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SlideError(first + more)
    summary = tile_cohort(
        jobs,
        config.tiling,
        cache_dir=slide_cache_dir(config),
        workers=workers,
        skip_errors=skip_errors,
    )
    summary.failed = {**missing, **summary.failed}
    if missing:
        write_json(Path(config.tiling.coords_dir) / "tiling_summary.json", summary.to_dict())
    return summary
