"""``bidistill heatmap``: for each slide of the chosen patients, every file a reviewer needs
(heatmap, montage, tiles CSV and GeoJSON, tissue outline; see the README), plus the drawn
patients' predictions table. A patch folder has no geometry (montage and CSV only); a slide
without an image gets the map over a white canvas."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bidistill._io import write_csv
from bidistill.config import ExperimentConfig, MaskKind
from bidistill.errors import BidistillError
from bidistill.inference.export import (
    contours_geojson,
    tile_size_level0,
    tiles_geojson,
    write_geojson,
    write_tiles_csv,
)
from bidistill.inference.heatmap import render_heatmap, render_montage
from bidistill.inference.inputs import FeaturesArg
from bidistill.inference.results import HeatmapScore, PatientPrediction, SlideAttention
from bidistill.inference.trained_run import ClinicalArg, TrainedRun
from bidistill.models.streaming import DEFAULT_MEMORY_BUDGET
from bidistill.runs.rundir import RunDir
from bidistill.slides.locate import SlideFinder, locate_annotations

log = logging.getLogger(__name__)


@dataclass
class MapsSummary:
    """What ``write_attention_maps`` wrote."""

    out_dir: Path
    predictions: pd.DataFrame  # one row per patient drawn (also written to out_dir)
    files: dict[str, list[Path]] = field(default_factory=dict)  # slide id → its files
    without_image: list[str] = field(default_factory=list)  # no --slides match


def write_attention_maps(
    run: TrainedRun,
    features: FeaturesArg,
    out_dir: str | Path,
    *,
    clinical: ClinicalArg = None,
    slides: Sequence[str | Path] = (),
    patients: Sequence[str] | None = None,
    top_k: int = 8,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
    score: HeatmapScore = "attention",
) -> MapsSummary:
    """Predict the patients and write heatmaps, montages and exports for each of their slides
    (a method without attention, clinical-only, is refused); ``score``: what each tile's value
    is, its attention or its leave-one-out effect (``TrainedRun.attention``)."""
    if not run.aggregators:
        raise BidistillError(
            f"{run.method} does not read slides, so it has no attention to draw; pick a method "
            "with slides (--method)"
        )
    out_dir = Path(out_dir)
    images = SlideFinder(slides)
    summary = MapsSummary(out_dir, pd.DataFrame())
    rows = []
    for patient in run.iter_patients(
        features,
        clinical,
        patients=patients,
        with_attention=True,
        memory_budget=memory_budget,
        progress=progress,
        score=score,
    ):
        rows.append(patient.row(run.method))
        for attention in patient.slides:
            image = images.find(attention.slide_id)
            if image is None:
                summary.without_image.append(attention.slide_id)
            summary.files[attention.slide_id] = write_slide_maps(
                out_dir, attention, patient, run.config, image=image, top_k=top_k
            )
    summary.predictions = pd.DataFrame(rows)
    write_csv(RunDir(out_dir).predictions, summary.predictions)
    return summary


def write_slide_maps(
    out_dir: Path,
    attention: SlideAttention,
    patient: PatientPrediction,
    config: ExperimentConfig,
    *,
    image: Path | None,
    top_k: int,
) -> list[Path]:
    """Every file for one slide (see the module docstring); returns the paths written."""
    from bidistill.slides.coords import read_tile_names
    from bidistill.slides.reader import open_slide
    from bidistill.slides.stage import slide_cache_dir

    def target(kind: str) -> Path:  # not with_suffix: slide ids may hold dots
        return out_dir / f"{attention.slide_id}.{kind}"

    rule = (
        "highest probability"
        if patient.class_probabilities
        else f"threshold {patient.threshold:.2f}"
    )
    title = (
        f"{attention.slide_id} (patient {patient.patient_id}): "
        f"P({patient.positive_class}) = {patient.probability:.2f} "
        f"→ {patient.predicted} ({rule}), branch: {patient.branch}"
    )
    slide = None
    if image is not None:
        mpp = config.slides.mpp if config.slides else None
        # A patch folder shows the patches that were encoded, not the folder as it is now.
        names = read_tile_names(attention.feature_file) if image.is_dir() else None
        slide = open_slide(image, mpp, cache_dir=slide_cache_dir(config), tile_names=names)
    try:
        whole = slide is not None and not slide.is_patch_folder
        tile = tile_size_level0(attention, slide.mpp if whole else None)
        written = [write_tiles_csv(target("tiles.csv"), attention, tile)]
        if slide is None or whole:
            written.append(write_geojson(target("tiles.geojson"), tiles_geojson(attention, tile)))
            written.append(
                render_heatmap(
                    target("heatmap.png"),
                    attention,
                    tile_size=tile,
                    title=title,
                    slide=slide,
                )
            )
        if slide is not None:
            written.append(
                render_montage(
                    target("montage.png"),
                    attention,
                    slide,
                    tile_size=tile,
                    title=title,
                    k=top_k,
                )
            )
        if whole:
            mask, downsample, kind = tiling_mask(slide, config, attention.slide_id, tile)
            name = "Tissue" if kind == MaskKind.tissue else "Region"
            contours = contours_geojson(mask, downsample, name=name)
            written.append(write_geojson(target("tissue.geojson"), contours))
        return written
    finally:
        if slide is not None:
            slide.close()


def tiling_mask(slide, config: ExperimentConfig, slide_id: str, tile_size: int):
    """(mask, (dx, dy) level-0 pixels per mask pixel, its kind): the mask tiling keeps tiles
    from, as ``bidistill tile`` makes it with the run's settings (tissue detection for a new
    slide without an annotation file)."""
    from bidistill.slides.tiling import slide_mask, thumbnail_downsample

    annotations_dir = config.slides.annotations_dir if config.slides else None
    annotations = locate_annotations(annotations_dir, slide_id)
    tiling = config.tiling
    if tiling.mask == MaskKind.annotations and annotations is None:
        tiling = tiling.model_copy(update={"mask": MaskKind.tissue})
    thumbnail, downsample = slide.thumbnail(
        thumbnail_downsample(slide.width, slide.height, tile_size)
    )
    mask, _, kind = slide_mask(slide, tiling, thumbnail, downsample, annotations)
    return mask, downsample, kind
