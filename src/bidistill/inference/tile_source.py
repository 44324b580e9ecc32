"""Bags from tiles: an end-to-end run's new patients, their tiles (of the run's patch size and
MPP) cut into bags as in the run's validation, so a test patient's probability is the one in
the run's own predictions."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from bidistill.cohort import EncodedClinical
from bidistill.cohort.prediction import PredictionCohort
from bidistill.config import ExperimentConfig
from bidistill.features.identity import FeatureIdentity, read_identity
from bidistill.inference.feature_source import identity_problems
from bidistill.inference.inputs import PatientInput, patient_inputs
from bidistill.inference.new_slides import Tiles, TilesError, listed_slides, tile_new_slides
from bidistill.inference.results import HeatmapScore, PatientBags
from bidistill.models import Method
from bidistill.models.patch_encoder import encoded_aggregators
from bidistill.training.tile_bags import TileBags, TileIndex, read_slide_tiles, tile_loader
from bidistill.training.tile_predict import GIVEN, predict_patients


class TileSource:
    """An end-to-end run's bags: each patient's tiles, cut into bags as in its validation."""

    reads_tiles = True
    # Its bags are sampled tiles through a trained backbone: leaving each tile out would run
    # the backbone once per tile of the slide (feature runs compute it in two passes).
    scores = ("attention",)

    def __init__(self, config: ExperimentConfig, meta: dict[str, Any], method_key: str):
        self.config = config
        self.settings = meta["end_to_end"]
        self.method_key = method_key

    def aggregators(self, method: Method) -> list[str]:
        return list(encoded_aggregators(method))

    def patients(
        self,
        features: Tiles | Any,
        cohort: PredictionCohort | None,
        wanted: Sequence[str] | None,
        *,
        needs_bags: bool,
    ) -> list[PatientInput]:
        """The patients to predict, every slide tiled and its tiles checked."""
        found: dict[str, tuple[Path, Path]] = {}
        if needs_bags:
            if not isinstance(features, Tiles):
                raise TilesError(
                    f"{self.method_key} was trained end to end on tiles: predict from slides and "
                    "their tiles (`bidistill predict --slides DIR [--tiles DIR]`, or Tiles(...) "
                    "in Python)"
                )
            found = tile_new_slides(self.config, features, listed_slides(cohort))
            for _, coords in found.values():
                self._check_tiles(coords)
        files = {s: coords for s, (_, coords) in found.items()} or None
        inputs = patient_inputs(files, cohort, wanted, needs_bags=needs_bags)
        slide_files = {s: slide for s, (slide, _) in found.items()}
        return [
            dataclasses.replace(
                item, slide_files=[slide_files[s] for s in item.slide_ids if s in slide_files]
            )
            for item in inputs
        ]

    def _check_tiles(self, path: Path) -> None:
        """Refuse tiles of another patch size or MPP (MPP within 2%) than the run's."""
        tiles = self.settings.get("tiles", {})
        expected = FeatureIdentity(patch_size=tiles.get("patch_size"), mpp=tiles.get("mpp"))
        problems = identity_problems(read_identity(path), expected)
        if problems:
            raise TilesError(
                f"{path}: tiles of another kind than the run was trained on: "
                f"{'; '.join(problems)}. Tile these slides with the run's `tiling` settings"
            )

    def predictions(
        self,
        methods: Sequence[Method],
        inputs: Sequence[PatientInput],
        encoded: Sequence[EncodedClinical],
        *,
        device: torch.device,
        with_attention: bool,
        memory_budget: int,
        score: HeatmapScore = "attention",
    ) -> Iterator[PatientBags]:
        """Per patient, every fold model's reduction of its bags (``memory_budget`` is for
        feature bags: tile bags are ``bag_size`` tiles)."""
        index = self._tile_index(inputs)
        loaders = [self._loader(index, clinical, device) for clinical in encoded]
        try:
            for i, item in enumerate(inputs):
                results = [
                    predict_patients(
                        method,
                        loader,
                        [(i, item.patient_id)],
                        self.settings,
                        device,
                        attention=with_attention,
                        routes=True,
                    )
                    for method, loader in zip(methods, loaders)
                ]
                routed = results[-1].routed
                yield PatientBags(
                    [result.probabilities[GIVEN][0] for result in results],
                    routed[0] if routed else None,
                    [tiles for result in results for tiles in result.attention],
                    index.lengths(i),
                    index.n_tiles(i),
                )
        finally:
            for loader in loaders:
                loader.dataset.close()

    def _tile_index(self, inputs: Sequence[PatientInput]) -> TileIndex:
        mpp = self.config.slides.mpp if self.config.slides else None
        files = {
            slide_id: (slide_file, coords)
            for item in inputs
            for slide_id, slide_file, coords in zip(item.slide_ids, item.slide_files, item.paths)
        }
        return TileIndex.of(
            [[s for s in item.slide_ids if s in files] for item in inputs],
            lambda slide_id: read_slide_tiles(slide_id, *files[slide_id], mpp),
        )

    def _loader(self, index: TileIndex, clinical: EncodedClinical, device: torch.device):
        from bidistill.slides.stage import slide_cache_dir

        dataset = TileBags(
            index,
            clinical.values,
            clinical.valid,
            clinical.present,
            None,
            augment=None,
            cache_dir=slide_cache_dir(self.config),
        )
        return tile_loader(dataset, workers=self.config.training.num_workers, device=device)
