"""Bags from tiles: an end-to-end run's new patients, their tiles through the fine-tuned encoders.

    run = load_run("runs/e2e")
    table = run.predict(Tiles("new/coords", slides=["new/wsi"]), clinical="new/patients.csv")

An end-to-end method reads tiles, not feature files: ``Tiles`` names the new slides (files,
patch folders, or folders of them) and the folder of their coords files. Slides without a coords
file there are tiled first with the run's ``tiling`` settings (annotations from
``Tiles.annotations``, else tissue detection), so ``--slides`` alone is enough. Tiles must be of
the run's patch size and MPP. A patient's tiles are cut into bags as in the run's validation
(``bag_size``, ``bags_per_patient``, a shuffle seeded by the run's seed and the patient id), and
its probability is the reduction (mean by default) of its bags' probabilities, so a test
patient's probability here is the one in the run's own predictions.

Attention: each tile's weight within its bag, times the bag's size over the patient's tile
count (so that the weights of a patient sum to 1, as in feature mode); tiles left out of every
bag (``bags_per_patient``) get NaN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bidistill.cohort import EncodedClinical
from bidistill.cohort.prediction import PredictionCohort
from bidistill.config import ExperimentConfig
from bidistill.devices import resolve_precision
from bidistill.features.identity import FeatureIdentity, read_identity
from bidistill.inference.feature_source import identity_problems
from bidistill.inference.inputs import PatientInput, patient_inputs
from bidistill.inference.new_slides import Tiles, TilesError, listed_slides, tile_new_slides
from bidistill.inference.results import PatientBags
from bidistill.models import Method
from bidistill.models.patch_encoder import encoded_aggregators
from bidistill.training.pixel_bags import (
    BagSpec,
    PixelBags,
    TileIndex,
    pixel_loader,
    prediction_bags,
    read_slide_tiles,
)
from bidistill.training.pixel_predict import GIVEN, reduce_bags, run_bags


class TileSource:
    """An end-to-end run's bags: each patient's tiles, cut into bags as in its validation."""

    reads_tiles = True

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
        """The patients to predict, every slide tiled and its tiles checked.

        Raises:
            TilesError: no ``Tiles`` given, a slide not found, or tiles of another patch size
                or MPP than the run's.
        """
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
    ) -> Iterator[PatientBags]:
        """Per patient, every fold model's reduction of its bags (``memory_budget`` is for
        feature bags: tile bags are ``bag_size`` tiles)."""
        index = self._tile_index(inputs)
        loaders = [self._loader(index, clinical, device) for clinical in encoded]
        try:
            for i, item in enumerate(inputs):
                yield self._predict_patient(
                    i, item.patient_id, index, methods, loaders, device, with_attention
                )
        finally:
            for loader in loaders:
                loader.dataset.close()

    def _tile_index(self, inputs: Sequence[PatientInput]) -> TileIndex:
        mpp = self.config.slides.mpp if self.config.slides else None
        order: dict[str, int] = {}
        slides, patients = [], []
        for item in inputs:
            indices = []
            for slide_id, slide_file, coords in zip(item.slide_ids, item.slide_files, item.paths):
                if slide_id not in order:
                    order[slide_id] = len(slides)
                    slides.append(read_slide_tiles(slide_id, slide_file, coords, mpp))
                indices.append(order[slide_id])
            patients.append(indices)
        return TileIndex(slides, patients)

    def _loader(self, index: TileIndex, clinical: EncodedClinical, device: torch.device):
        from bidistill.slides.stage import slide_cache_dir

        dataset = PixelBags(
            index,
            clinical.values,
            clinical.valid,
            clinical.present,
            None,
            augment=None,
            cache_dir=slide_cache_dir(self.config),
        )
        return pixel_loader(dataset, workers=self.config.training.num_workers, device=device)

    def _predict_patient(
        self, i, patient_id, index, methods, loaders, device, with_attention
    ) -> PatientBags:
        s = self.settings
        n = index.n_tiles(i)
        bags = prediction_bags(
            n, patient_id, seed=s["seed"], bag_size=s["bag_size"], limit=s["bags_per_patient"]
        )
        specs = [BagSpec(i, tiles) for tiles in bags]
        precision = resolve_precision(s.get("precision", "auto"), device)
        probabilities, attention, routed = [], [], None
        for method, loader in zip(methods, loaders):
            result = run_bags(
                method,
                loader,
                specs,
                device,
                eval_batch=s["eval_batch"],
                precision=precision,
                attention=with_attention,
                routes=True,
            )
            bag_probabilities = result.probabilities[GIVEN]
            probabilities.append(reduce_bags(specs, bag_probabilities, i + 1, s["reduction"])[i])
            routed = result.routed[0] if result.routed else None
            if with_attention:
                attention.append(_tile_attention(specs, result.attention, n))
        return PatientBags(probabilities, routed, attention, index.lengths(i), n)


def _tile_attention(specs, attention: list[dict[str, np.ndarray]], n_tiles: int) -> dict:
    """Per aggregator, each tile's weight over the patient: its weight in its bag times the
    bag's size over the patient's tile count (NaN for a tile in no bag)."""
    names = attention[0].keys() if attention else []
    out = {name: np.full(n_tiles, np.nan) for name in names}
    for spec, weights in zip(specs, attention):
        if not spec.tiles:
            continue
        scale = len(spec.tiles) / n_tiles
        for name, w in weights.items():
            out[name][list(spec.tiles)] = w * scale
    return out
