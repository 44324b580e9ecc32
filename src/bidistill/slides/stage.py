"""The tiling stage's driver: the cohort's slides as jobs, tiled in parallel (with
``bidistill.slide_stages``), resumable: a slide whose coords file records its current signature
is done.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from bidistill._io import write_json
from bidistill._paths import lookup_named
from bidistill.config import ExperimentConfig, TilingConfig
from bidistill.errors import ConfigError
from bidistill.slide_stages import (
    SKIP_ERRORS_HINT,
    Recorder,
    Shard,
    StageSummary,
    describe_failure,
    folder_size,
    missing_slides,
    plan_slides,
    run_slides,
)
from bidistill.slides.coords import coords_path
from bidistill.slides.locate import index_slide_files, locate_annotations
from bidistill.slides.qc import qc_path, write_patch_folder_qc, write_tiling_qc
from bidistill.slides.reader import SLIDE_SUFFIXES, PatchFolder, open_slide
from bidistill.slides.signature import change_since, slide_signature
from bidistill.slides.tiling import tile_slide, write_patch_folder_coords, write_slide_tiling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideJob:
    """One slide to tile: its id, its file (or patch folder), its MPP from the config, if any,
    and its annotation file, if any."""

    slide_id: str
    path: Path
    mpp: float | None = None
    annotations: Path | None = None


def jobs_from_config(config: ExperimentConfig) -> tuple[list[SlideJob], dict[str, str]]:
    """The cohort's slides as jobs, plus the slides whose file was not found (id → reason)."""
    from bidistill.cohort import load_cohort

    if config.slides is None:
        raise ConfigError("the config has no `slides` section: set `slides.dir` to tile slides")
    slides_cfg = config.slides
    # Tiling needs no labels: a label of one class is the training stage's concern.
    cohort = load_cohort(config.cohort, mpp_column=slides_cfg.mpp_column, require_classes=False)
    table = cohort.slides
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


def tile_one(job: SlideJob, tiling: TilingConfig, cache_dir: Path) -> int:
    """Tile one slide, write its QC image and coords file (in that order); the tiles kept."""
    target = coords_path(tiling.coords_dir, job.slide_id)
    # Signed before reading: a slide replaced while it is tiled is seen as changed next time.
    signature = slide_signature(job.path) if job.path.exists() else None
    with open_slide(job.path, job.mpp, cache_dir=cache_dir) as slide:
        if isinstance(slide, PatchFolder):
            if tiling.qc:
                write_patch_folder_qc(qc_path(tiling.coords_dir, job.slide_id), slide)
            write_patch_folder_coords(target, slide, tiling, signature=signature)
            return len(slide.patch_paths)
        result = tile_slide(slide, tiling, annotations_path=job.annotations)
        if tiling.qc:
            write_tiling_qc(qc_path(tiling.coords_dir, job.slide_id), result)
        write_slide_tiling(target, slide, result, signature=signature)
    if len(result.coords) == 0:
        log.info("%s: no tile kept (see its QC image)", job.path)  # the summary says it too
    return len(result.coords)


@dataclass(frozen=True)
class _TileWork:
    """The pool's work function: tile one slide, report the outcome instead of raising."""

    tiling: TilingConfig
    cache_dir: Path

    def __call__(self, job: SlideJob) -> tuple[str, int | None, str | None]:
        try:
            return job.slide_id, tile_one(job, self.tiling, self.cache_dir), None
        except Exception as err:  # a damaged file can surface as any library's error
            return job.slide_id, None, describe_failure(err, job.path)


def tile_cohort(
    jobs: list[SlideJob],
    tiling: TilingConfig,
    *,
    cache_dir: Path | None = None,
    workers: int | None = None,
    skip_errors: bool = False,
    progress: bool = True,
    shard: Shard | None = None,
    hint: str = SKIP_ERRORS_HINT,
) -> StageSummary:
    """Tile every slide (of this shard) whose coords file does not exist yet, or was made from
    another version of the slide (``summary.redone`` says which and why); ``cache_dir`` (default
    ``<coords_dir>/.cache``) is where plain images are converted, ``workers`` 1 tiles in this
    process. The summary's ``done`` counts tiles kept per slide tiled now.
    """
    coords_dir = Path(tiling.coords_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else coords_dir / ".cache"
    summary = StageSummary(stage="tiling")
    todo = plan_slides(
        jobs,
        slide_id=lambda j: j.slide_id,
        is_done=lambda j: _is_tiled(j, coords_dir, summary),
        shard=shard or Shard(),
        summary=summary,
    )
    recorder = Recorder(summary, skip_errors=skip_errors, hint=hint)
    try:
        run_slides(
            todo,
            _TileWork(tiling, cache_dir),
            recorder=recorder,
            workers=workers or tiling.workers,
            progress=progress,
            description="tiling slides",
        )
    finally:
        summary.extra["cache_dir"] = str(cache_dir)
        summary.extra["cache_mb"] = round(folder_size(cache_dir) / 2**20, 1)
        if todo:
            write_json(coords_dir / summary_file(summary), summary.to_dict())
    return summary


def _is_tiled(job: SlideJob, coords_dir: Path, summary: StageSummary) -> bool:
    """The slide has a coords file made from the slide as it is now (else it is redone, and
    ``summary.redone`` says why)."""
    target = coords_path(coords_dir, job.slide_id)
    if not target.is_file():
        return False
    change = change_since(target, job.path)
    if change is None:
        return True
    summary.redone[job.slide_id] = f"{job.path} changed since it was tiled ({change})"
    log.info("%s: %s; tiling it again", job.slide_id, summary.redone[job.slide_id])
    return False


def summary_file(summary: StageSummary) -> str:
    """``<stage>_summary.json``, or one per shard (``tiling_summary.shard1of4.json``)."""
    if summary.shard is None:
        return f"{summary.stage}_summary.json"
    index, count = summary.shard.split("/")
    return f"{summary.stage}_summary.shard{index}of{count}.json"


def slide_cache_dir(config: ExperimentConfig) -> Path:
    """Where plain images of this experiment are converted: ``slides.cache_dir``, else
    ``<tiling.coords_dir>/.cache``. Later stages (feature extraction, heatmaps) pass it to
    ``open_slide`` so they reuse the conversion instead of redoing it."""
    if config.slides is not None and config.slides.cache_dir is not None:
        return Path(config.slides.cache_dir)
    return Path(config.tiling.coords_dir) / ".cache"


def tile_from_config(
    config: ExperimentConfig,
    *,
    workers: int | None = None,
    skip_errors: bool = False,
    shard: Shard | None = None,
    progress: bool = True,
    hint: str = SKIP_ERRORS_HINT,
) -> StageSummary:
    """Tile the cohort of an experiment config (what `bidistill tile CONFIG` does)."""
    jobs, missing = jobs_from_config(config)
    shard = shard or Shard()
    missing = missing_slides(missing, shard, skip_errors=skip_errors, hint=hint)
    summary = tile_cohort(
        jobs,
        config.tiling,
        cache_dir=slide_cache_dir(config),
        workers=workers,
        skip_errors=skip_errors,
        progress=progress,
        shard=shard,
        hint=hint,
    )
    summary.failed = {**missing, **summary.failed}
    if missing:
        write_json(Path(config.tiling.coords_dir) / summary_file(summary), summary.to_dict())
    return summary
