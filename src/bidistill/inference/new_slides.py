"""New patients' slides, made ready with a trained run's own settings.

``tile_new_slides`` tiles the slides without a coords file yet with the run's ``tiling`` (a
slide without annotations is tiled on its detected tissue); a feature run then encodes them
with the run's encoder (``extract_new_slides``: so the features' identity is the run's); an
end-to-end run reads the tiles themselves. Both skip what is done, so a rerun is cheap."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bidistill.cohort.prediction import PredictionCohort
from bidistill.config import ExperimentConfig, MaskKind
from bidistill.errors import BidistillError

log = logging.getLogger(__name__)

# What a failing new slide's error says (prediction has no --skip-errors: one bad slide stops it).
PREDICT_HINT = "fix or remove that slide (or its patient's rows) and predict again"


class TilesError(BidistillError, ValueError):
    """New slides that a run cannot predict from (missing, or tiles of another size or MPP)."""


@dataclass(frozen=True)
class Tiles:
    """New patients' slides (files, patch folders, or folders of them) and the folder of their
    coords files (a feature run's new features go to ``coords/features/``); ``annotations``:
    ``<slide_id>.json``/``.geojson`` for tiling, default beside each slide file."""

    coords: Path
    slides: Sequence[Path] = field(default_factory=tuple)
    annotations: Path | None = None

    @property
    def features(self) -> Path:
        return Path(self.coords) / "features"


def listed_slides(cohort: PredictionCohort | None) -> list[str] | None:
    """The slides a table of new patients lists; None without a table (every slide given)."""
    return None if cohort is None else [s for v in cohort.slides_of().values() for s in v]


def tile_new_slides(
    config: ExperimentConfig, tiles: Tiles, slide_ids: Sequence[str] | None = None
) -> dict[str, tuple[Path, Path]]:
    """slide id → (slide file, coords file) of ``slide_ids`` (default: every slide
    ``tiles.slides`` names), tiling with the run's settings the slides without coords first."""
    from bidistill.slides import coords_path
    from bidistill.slides.locate import SlideFinder, locate_annotations
    from bidistill.slides.stage import SlideJob, tile_cohort

    if not tiles.slides:
        raise TilesError(
            "no slides to predict from: give the slides (--slides: files, patch folders or "
            "folders of slides); their tiles go to --tiles"
        )
    finder = SlideFinder(tiles.slides)
    wanted = list(slide_ids) if slide_ids is not None else finder.slide_ids()
    absent = [s for s in wanted if finder.find(s) is None]
    if absent:
        raise TilesError(
            f"no slide file or patch folder for slides {absent[:5]} in "
            f"{', '.join(map(str, tiles.slides))}"
        )
    mpp = config.slides.mpp if config.slides else None
    jobs = []
    for s in wanted:
        path = finder.find(s)
        # Annotations from Tiles.annotations, else beside the slide (BCNB keeps them there).
        folder = tiles.annotations or (path.parent if path.is_file() else None)
        jobs.append(SlideJob(s, path, mpp, locate_annotations(folder, s)))
    # A new slide without annotations gets tissue detection, whatever the run's mask.
    mask = MaskKind.auto if config.tiling.mask == MaskKind.annotations else None
    update = {"coords_dir": Path(tiles.coords), **({"mask": mask} if mask else {})}
    tiling = config.tiling.model_copy(update=update)
    # Slide ids name files, not pixels: a later batch may reuse an id, or a file be replaced.
    # The tiling stage redoes a slide whose coords file records another file, and extraction
    # then redoes its features.
    tiled = tile_cohort(jobs, tiling, workers=1, progress=False, hint=PREDICT_HINT)
    for slide_id, why in tiled.redone.items():
        log.warning(
            "%s: tiled from another file than the one given now (%s: a slide of an earlier batch "
            "with the same id, or the file was replaced); tiling and encoding it again",
            slide_id,
            why,
        )
    found = {j.slide_id: (j.path, coords_path(tiles.coords, j.slide_id)) for j in jobs}
    _refuse_empty(found, tiles, qc=tiling.qc)
    return found


def _refuse_empty(found: dict[str, tuple[Path, Path]], tiles: Tiles, *, qc: bool) -> None:
    """A slide without a single tile (blank, or no tissue found) has nothing to predict from:
    refused by name, as training refuses it, rather than given a decision."""
    from bidistill.slides import read_coords

    empty = [slide for slide, coords in found.values() if not len(read_coords(coords).coords)]
    if empty:
        names = ", ".join(map(str, empty[:5]))
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        seen = f"; see {Path(tiles.coords) / 'qc'}" if qc else ""
        raise TilesError(
            f"{names}{more}: no tile kept (a blank slide, or no tissue found{seen}), so there is "
            "nothing to predict from; remove the slide (or its patient's rows of the table) and "
            "predict again"
        )


def extract_new_slides(
    config: ExperimentConfig, found: dict[str, tuple[Path, Path]], features_dir: Path
) -> Path:
    """Encode the tiled new slides with the run's encoder into ``features_dir``; returns it.

    Raises:
        SlideError: a slide cannot be read. EncoderError: the run's encoder cannot be loaded.
    """
    from bidistill.features.extract import ExtractionJob, extract_features
    from bidistill.features.store import feature_path

    mpp = config.slides.mpp if config.slides else None
    jobs = [
        ExtractionJob(slide_id, slide, coords, feature_path(features_dir, slide_id), mpp)
        for slide_id, (slide, coords) in found.items()
    ]
    features = config.features.model_copy(update={"dir": Path(features_dir)})
    cache_dir = next(iter(found.values()))[1].parent / ".cache" if found else features_dir
    extract_features(jobs, features, cache_dir=cache_dir, progress=False, hint=PREDICT_HINT)
    return Path(features_dir)
