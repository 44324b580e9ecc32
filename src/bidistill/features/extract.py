"""Feature extraction: tiles of every slide → one ``<features_dir>/<slide_id>.h5`` per slide.

Workers decode tiles into shared-memory uint8 batches (``features.tiles``); the main process
preprocesses and encodes them on the device. A batch never spans two slides and starts at a
multiple of the batch size within its slide, so a slide's features do not depend on which worker,
shard or process computed them. A file is written atomically once its slide is encoded (a file
that exists is a slide done) and copies its coords file's slide signature: features of a slide
tiled again since are extracted again, a slide changed since it was tiled is refused.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from bidistill._io import write_json
from bidistill.config import ExperimentConfig, FeaturesConfig
from bidistill.devices import resolve_device, resolve_precision
from bidistill.features.encoders import Encoder, load_encoder
from bidistill.features.identity import FeatureIdentity, check_matches, common_identity
from bidistill.features.store import feature_path, write_feature_file
from bidistill.features.tiles import coords_header, load_tiles
from bidistill.slide_stages import (
    SKIP_ERRORS_HINT,
    Recorder,
    Shard,
    StageSummary,
    missing_slides,
    plan_slides,
)
from bidistill.slides.coords import nan_if_none
from bidistill.slides.signature import (
    SIGNATURE_KEYS,
    change_since,
    recorded_signature,
    signature_change,
)
from bidistill.slides.stage import summary_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractionJob:
    """One slide to encode: where its pixels and tile coordinates are, where its features go."""

    slide_id: str
    slide_path: Path
    coords_path: Path
    target: Path
    mpp: float | None = None  # for slide files that lack it (the config's value)


@dataclass
class _Pending:
    """Features of a slide whose patches are still arriving."""

    features: np.ndarray  # [n, D] float32
    filled: int = 0


class Extractor:
    """Runs one encoder over slides and writes their feature files (``cache_dir``: the
    plain-image cache the tiling stage filled, ``slide_cache_dir``)."""

    def __init__(
        self,
        encoder: Encoder,
        *,
        batch_size: int = 64,
        num_workers: int = 2,
        device: torch.device | None = None,
        precision: torch.dtype = torch.float32,
        cache_dir: Path,
    ) -> None:
        self.encoder = encoder
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device or torch.device("cpu")
        self.precision = precision
        self.cache_dir = cache_dir
        self.model = encoder.model.to(self.device).eval()
        # Channels-last convolutions: faster with cuDNN and with oneDNN on the CPU alike (about
        # 1.4x per CPU-second for resnet50-trunc here); tiles arrive in that layout anyway.
        self.channels_last = self.device.type in ("cuda", "cpu")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def run(self, jobs: Sequence[ExtractionJob], recorder: Recorder, *, progress: bool) -> None:
        """Encode every job's tiles and write its file; outcomes go to ``recorder``."""
        if not jobs:
            return
        chunks = load_tiles(
            jobs,
            batch_size=self.batch_size,
            cache_dir=self.cache_dir,
            num_workers=self.num_workers,
        )
        total = sum(coords_header(job.coords_path)[0] for job in jobs)
        pending: dict[int, _Pending] = {}
        started = time.perf_counter()
        with (
            contextlib.closing(chunks),  # a failing slide stops the workers now, not at exit
            _ExtractionProgress(len(jobs), total, progress) as bar,
            torch.inference_mode(),
        ):
            for chunk in chunks:
                job = jobs[chunk.job]
                if chunk.error is not None:
                    pending.pop(chunk.job, None)
                    bar.slide_done()
                    recorder.failure(job.slide_id, chunk.error)
                    continue
                if chunk.total == 0:
                    self._write(job, np.zeros((0, self.encoder.dim), np.float32))
                    recorder.success(job.slide_id, 0)
                    bar.slide_done()
                    continue
                slide = pending.setdefault(
                    chunk.job, _Pending(np.empty((chunk.total, self.encoder.dim), np.float32))
                )
                n = len(chunk.pixels)
                slide.features[chunk.start : chunk.start + n] = self.encode(chunk.pixels)
                slide.filled += n
                bar.patches(n)
                if slide.filled == chunk.total:
                    self._write(job, pending.pop(chunk.job).features)
                    recorder.success(job.slide_id, chunk.total)
                    bar.slide_done()
        recorder.summary.seconds += time.perf_counter() - started

    def encode(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 [b, H, W, 3] (CPU) → float32 features [b, D]."""
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC = channels-last
        x = self.encoder.preprocess(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(self.device.type, dtype=self.precision)
            if self.precision != torch.float32
            else contextlib.nullcontext()
        )
        with autocast:
            out = self.model(x)
        return out.float().cpu().numpy()

    def _write(self, job: ExtractionJob, features: np.ndarray) -> None:
        from bidistill.slides import read_coords

        tiles = read_coords(job.coords_path)
        write_feature_file(
            job.target,
            features,
            tiles.coords,
            encoder=self.encoder.name,
            patch_size=tiles.patch_size,
            mpp=nan_if_none(tiles.attrs.get("mpp")),
            level=int(tiles.attrs.get("level", 0)),
            paths=tiles.paths,
            extra_attrs={
                "encoder_weights_sha256": self.encoder.weights_sha256,
                "encoder_source": self.encoder.source,
                "random_init": bool(self.encoder.random_init),
                "patch_size_level0": tiles.patch_size_level0,
                "precision": str(self.precision).removeprefix("torch."),
                "input_size": self.encoder.preprocess.size,
                "slide_mpp": nan_if_none(tiles.attrs.get("slide_mpp")),
                **{k: tiles.attrs[k] for k in SIGNATURE_KEYS if k in tiles.attrs},
            },
            coords_attrs=tiles.tool_attrs(job.slide_id),
        )


class _ExtractionProgress:
    """A rich bar over patches, with slides done and patches per second."""

    def __init__(self, slides: int, patches: int, enabled: bool) -> None:
        from rich import progress

        self.slides, self.slides_done = slides, 0
        self.bar = progress.Progress(
            progress.TextColumn("extracting"),
            progress.BarColumn(),
            progress.MofNCompleteColumn(),
            progress.TextColumn(
                "patches, {task.fields[slides]} slides, {task.fields[rate]} patches/s"
            ),
            progress.TimeRemainingColumn(),
            disable=not enabled or slides == 0,
        )
        self.task = self.bar.add_task("extract", total=patches, slides=f"0/{slides}", rate="-")

    def __enter__(self) -> _ExtractionProgress:
        self.bar.start()
        return self

    def patches(self, n: int) -> None:
        self.bar.advance(self.task, n)
        speed = self.bar.tasks[0].speed
        self.bar.update(self.task, rate=f"{speed:.0f}" if speed else "-")

    def slide_done(self) -> None:
        self.slides_done += 1
        self.bar.update(self.task, slides=f"{self.slides_done}/{self.slides}")

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


def extraction_jobs(config: ExperimentConfig) -> tuple[list[ExtractionJob], dict[str, str]]:
    """The cohort's slides as extraction jobs, plus slides that cannot be (id → reason)."""
    from bidistill.slides import coords_path, jobs_from_config

    slides, missing = jobs_from_config(config)
    features_dir = Path(config.features.dir)
    jobs = [
        ExtractionJob(
            slide_id=s.slide_id,
            slide_path=s.path,
            coords_path=coords_path(config.tiling.coords_dir, s.slide_id),
            target=feature_path(features_dir, s.slide_id),
            mpp=s.mpp,
        )
        for s in slides
    ]
    return jobs, missing


def out_of_date_slides(config: ExperimentConfig) -> list[str]:
    """Slides whose feature file exists but was made from another version of the slide or of
    its tiles (a rescan replaced it): `bidistill run` tiles and extracts them again."""
    if config.slides is None or not Path(config.slides.dir).is_dir():
        return []
    jobs, _ = extraction_jobs(config)
    scratch = StageSummary(stage="extraction")
    return [j.slide_id for j in jobs if j.target.is_file() and not _is_extracted(j, scratch)]


def load_config_encoder(features: FeaturesConfig) -> Encoder:
    """The encoder that ``features`` names, with its weights."""
    return load_encoder(
        features.encoder, checkpoint=features.checkpoint, random_init=features.random_init
    )


def extract_features(
    jobs: Sequence[ExtractionJob],
    features: FeaturesConfig,
    *,
    cache_dir: Path,
    shard: Shard | None = None,
    skip_errors: bool = False,
    progress: bool = True,
    encoder: Encoder | None = None,
    hint: str = SKIP_ERRORS_HINT,
) -> StageSummary:
    """Extract the features of every job (of this shard) whose file does not exist yet; the
    summary's ``done`` counts patches per slide extracted now.

    Raises:
        SlideError: a slide fails (unreadable, not tiled) and ``skip_errors`` is off.
        FeatureFileError: the features folder holds files of another encoder.
    """
    summary = StageSummary(stage="extraction")
    todo = plan_slides(
        list(jobs),
        slide_id=lambda j: j.slide_id,
        is_done=lambda j: _is_extracted(j, summary),
        shard=shard or Shard(),
        summary=summary,
    )
    recorder = Recorder(summary, skip_errors=skip_errors, hint=hint)
    todo = [job for job in todo if _is_tiled(job, recorder)]
    if not todo:
        return summary
    encoder = encoder or load_config_encoder(features)
    device = resolve_device(features.device)
    precision = resolve_precision(features.precision, device)
    extractor = Extractor(
        encoder,
        batch_size=features.batch_size,
        num_workers=features.num_workers,
        device=device,
        precision=precision,
        cache_dir=cache_dir,
    )
    _refuse_other_features(encoder, jobs)
    _warn_on_mpp(encoder, todo)
    log.info(
        "extracting %d slides with %s (%s, %s on %s)",
        len(todo),
        encoder.name,
        encoder.source,
        str(precision).removeprefix("torch."),
        device,
    )
    try:
        extractor.run(todo, recorder, progress=progress)
    finally:
        summary.extra.update(
            {
                "encoder": encoder.name,
                "encoder_weights_sha256": encoder.weights_sha256,
                "random_init": encoder.random_init,
                "device": str(device),
                "precision": str(precision).removeprefix("torch."),
            }
        )
        target_dir = todo[0].target.parent
        write_json(target_dir / summary_file(summary), summary.to_dict())
    return summary


def _is_extracted(job: ExtractionJob, summary: StageSummary) -> bool:
    """The slide has features of its current tiles, from the slide as it is now (else it is
    redone, and ``summary.redone`` says why)."""
    if not job.target.is_file():
        return False
    if job.coords_path.is_file():
        if change_since(job.coords_path, job.slide_path) is not None:
            return False  # `_is_tiled` says that the slide must be tiled again
        tiled = recorded_signature(job.coords_path)
        change = signature_change(recorded_signature(job.target), tiled) if tiled else None
        if change is not None:
            summary.redone[job.slide_id] = (
                f"{job.slide_path} was tiled again since its features were extracted ({change})"
            )
            log.info("%s: %s; extracting it again", job.slide_id, summary.redone[job.slide_id])
            return False
    return True


def _is_tiled(job: ExtractionJob, recorder: Recorder) -> bool:
    if not job.coords_path.is_file():
        recorder.failure(
            job.slide_id,
            f"{job.coords_path}: no tile coordinates for slide '{job.slide_id}' (tile it first "
            "with `bidistill tile`)",
        )
        return False
    change = change_since(job.coords_path, job.slide_path)
    if change is not None:
        recorder.failure(
            job.slide_id,
            f"{job.slide_path}: the slide changed since it was tiled ({change}); its tiles in "
            f"{job.coords_path} are of the old slide: tile it again with `bidistill tile`, then "
            "extract",
        )
        return False
    return True


def _refuse_other_features(encoder: Encoder, jobs: Sequence[ExtractionJob]) -> None:
    """Refuse to add features of this encoder to a folder that holds another encoder's."""
    existing = [job.target for job in jobs if job.target.is_file()]
    if not existing:
        return
    check_matches(
        FeatureIdentity(encoder.name, encoder.weights_sha256, encoder.random_init),
        common_identity(existing),
        actual_where="this config's encoder",
        expected_where=f"{existing[0].parent} (e.g. {existing[0].name})",
    )
    log.info("resuming: %d of %d slides already extracted", len(existing), len(jobs))


def _warn_on_mpp(encoder: Encoder, todo: Sequence[ExtractionJob]) -> None:
    """Say so when tiles are not at the MPP the encoder was trained at (a common silent error)."""
    if encoder.spec.mpp is None:
        return
    with h5py.File(todo[0].coords_path, "r") as h5:
        mpp = float(h5.attrs.get("mpp", float("nan")))
    if math.isnan(mpp) or abs(mpp - encoder.spec.mpp) / encoder.spec.mpp > 0.1:
        log.warning(
            "%s was trained on tiles at %g um/px; these are at %s (set tiling.mpp: %g)",
            encoder.name,
            encoder.spec.mpp,
            "an unknown MPP" if math.isnan(mpp) else f"{mpp:g} um/px",
            encoder.spec.mpp,
        )


def extract_from_config(
    config: ExperimentConfig,
    *,
    shard: Shard | None = None,
    skip_errors: bool = False,
    progress: bool = True,
    hint: str = SKIP_ERRORS_HINT,
) -> StageSummary:
    """What `bidistill extract CONFIG` does: every slide of the cohort that has no features yet."""
    from bidistill.slides import slide_cache_dir

    jobs, missing = extraction_jobs(config)
    shard = shard or Shard()
    missing = missing_slides(missing, shard, skip_errors=skip_errors, hint=hint)
    summary = extract_features(
        jobs,
        config.features,
        cache_dir=slide_cache_dir(config),
        shard=shard,
        skip_errors=skip_errors,
        progress=progress,
        hint=hint,
    )
    summary.failed = {**missing, **summary.failed}
    return summary


def gather_summaries(summary: StageSummary) -> StageSummary | None:
    """Under torchrun, every rank's summary merged, on rank 0 (None on the other ranks);
    elsewhere the summary itself.

    Only the summaries travel (over gloo, on any device): the ranks share no other work.
    """
    shard = Shard.from_env()
    if shard is None or shard.count == 1 or "MASTER_ADDR" not in os.environ:
        return summary
    import torch.distributed as dist

    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group(backend="gloo")
    try:
        parts: list[StageSummary | None] = [None] * shard.count
        dist.all_gather_object(parts, summary)
    finally:
        if started_here:
            dist.destroy_process_group()
    merged = StageSummary.merged([p for p in parts if p is not None])
    return merged if shard.index == 0 else None
