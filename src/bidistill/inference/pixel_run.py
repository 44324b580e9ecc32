"""Prediction with an end-to-end run: new patients' tiles through the fine-tuned encoders.

    run = load_run("runs/e2e")                                   # a PixelRun
    table = run.predict(Tiles("new/coords", slides=["new/wsi"]), clinical="new/patients.csv")

An end-to-end method reads tiles, not feature files: ``Tiles`` names the new slides (files,
patch folders, or folders of them) and the folder of their coords files. Slides without a coords
file there are tiled first with the run's ``tiling`` settings (annotations from
``Tiles.annotations``, else tissue detection), so ``--slides`` alone is enough. Tiles must be of
the run's patch size and MPP. A patient's tiles are cut into bags as in the run's validation
(``bag_size``, ``bags_per_patient``, a shuffle seeded by the run's seed and the patient id), and
its probability is the reduction (mean by default) of its bags' probabilities, so a test
patient's probability here is the one in the run's ``predictions.csv``.

Attention: each tile's weight within its bag, times the bag's size over the patient's tile
count (so that the weights of a patient sum to 1, as in feature mode); tiles left out of every
bag (``bags_per_patient``) get NaN.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from bidistill.cohort import EncodedClinical
from bidistill.inference.inputs import PatientInput, clinical_frame, patient_inputs
from bidistill.inference.new_slides import Tiles, TilesError, tile_new_slides
from bidistill.inference.results import PatientPrediction
from bidistill.inference.run import ClinicalArg, TrainedRun, _branch_names
from bidistill.models.patch_encoder import encoded_aggregators
from bidistill.models.streaming import DEFAULT_MEMORY_BUDGET

log = logging.getLogger(__name__)


class PixelRun(TrainedRun):
    """A trained end-to-end method of a run directory (``load_run`` returns one).

    ``predict``, ``attention`` and ``iter_patients`` take a ``Tiles`` where a feature-mode run
    takes feature files; everything else is as ``TrainedRun``.
    """

    end_to_end = True

    def __init__(self, run_dir, method, config, folds, device):
        super().__init__(run_dir, method, config, folds, device)
        first = folds[0]
        self.aggregators = list(encoded_aggregators(first.method))
        self._branch_names = _branch_names(self.aggregators, first.meta["method"])
        self.settings = first.meta["end_to_end"]

    # --- inputs ---------------------------------------------------------------------------------

    def prepare_tiles(self, tiles: Tiles, slide_ids: Sequence[str] | None = None) -> dict:
        """slide id → (slide file, coords file), tiling the slides without coords first.

        Raises:
            TilesError: no slides given, a slide of ``slide_ids`` not found, or tiles of
                another patch size or MPP than the run's.
        """
        found = tile_new_slides(self.config, tiles, slide_ids)
        for path in (c for _, c in found.values()):
            self._check_tiles(path)
        return found

    def _check_tiles(self, path: Path) -> None:
        from bidistill.slides import read_coords

        expected = self.settings.get("tiles", {})
        attrs = read_coords(path).attrs
        problems = []
        if expected.get("patch_size") and int(attrs["patch_size"]) != int(expected["patch_size"]):
            problems.append(
                f"patch size {attrs['patch_size']} (the run's: {expected['patch_size']})"
            )
        mpp, run_mpp = attrs.get("mpp"), expected.get("mpp")
        if mpp is not None and run_mpp is not None and not math.isclose(mpp, run_mpp, rel_tol=0.02):
            problems.append(f"MPP {mpp:g} (the run's: {run_mpp:g})")
        if problems:
            raise TilesError(
                f"{path}: tiles of another kind than the run was trained on: "
                f"{'; '.join(problems)}. Tile these slides with the run's `tiling` settings"
            )

    # --- prediction -----------------------------------------------------------------------------

    def iter_patients(
        self,
        features,
        clinical: ClinicalArg = None,
        *,
        patients: Sequence[str] | None = None,
        with_attention: bool = False,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        progress: bool = False,
    ) -> Iterator[PatientPrediction]:
        """Patients one at a time; ``features`` is a ``Tiles`` (see the module docstring)."""
        if not isinstance(features, Tiles) and self.aggregators:
            raise TilesError(
                f"{self.method} was trained end to end on tiles: predict from slides and their "
                "tiles (`bidistill predict --slides DIR [--tiles DIR]`, or Tiles(...) in Python)"
            )
        cohort = self._cohort(clinical)
        listed = None if cohort is None else [s for v in cohort.slides_of().values() for s in v]
        found = self.prepare_tiles(features, listed) if self.aggregators else {}
        files = {s: coords for s, (_, coords) in found.items()} or None
        inputs = patient_inputs(files, cohort, patients, needs_bags=bool(self.aggregators))
        frame = clinical_frame(cohort, [p.patient_id for p in inputs], self.folds[0].encoder)
        encoded = [fold.encoder.transform(frame) for fold in self.folds]
        names = np.array(self.folds[0].encoder.feature_names_in_, dtype=object)
        missing = ~encoded[0].valid
        loaders = [self._loader(inputs, e, found) for e in encoded]
        sequence: Sequence[int] | Iterator[int] = range(len(inputs))
        if progress:
            from bidistill._progress import transient_track

            sequence = transient_track(sequence, "predicting")
        try:
            for i in sequence:
                yield self._predict_patient(
                    i,
                    inputs[i],
                    encoded,
                    [str(c) for c in names[missing[i]]],
                    loaders,
                    with_attention=with_attention,
                )
        finally:
            for _, loader in loaders:
                loader.dataset.close()

    def _loader(self, inputs: list[PatientInput], encoded: EncodedClinical, found: dict):
        from bidistill.slides.run import slide_cache_dir
        from bidistill.training.pixel_bags import (
            PixelBags,
            TileIndex,
            pixel_loader,
            read_slide_tiles,
        )

        mpp = self.config.slides.mpp if self.config.slides else None
        order: dict[str, int] = {}
        slides, patients = [], []
        for item in inputs:
            indices = []
            for slide_id in item.slide_ids if self.aggregators else []:
                if slide_id not in order:
                    slide_path, coords = found[slide_id]
                    order[slide_id] = len(slides)
                    slides.append(read_slide_tiles(slide_id, slide_path, coords, mpp))
                indices.append(order[slide_id])
            patients.append(indices)
        index = TileIndex(slides, patients)
        dataset = PixelBags(
            index,
            encoded.values,
            encoded.valid,
            encoded.present,
            None,
            augment=None,
            cache_dir=slide_cache_dir(self.config),
        )
        workers = self.config.training.num_workers
        return index, pixel_loader(dataset, workers=workers, device=self.device)

    def _predict_patient(
        self, i, item, encoded, clinical_missing, loaders, *, with_attention: bool
    ) -> PatientPrediction:
        from bidistill.devices import resolve_precision
        from bidistill.training.pixel_bags import BagSpec, prediction_bags
        from bidistill.training.pixel_predict import GIVEN, reduce_bags, run_bags

        s = self.settings
        index = loaders[0][0]
        n = index.n_tiles(i)
        bags = prediction_bags(
            n, item.patient_id, seed=s["seed"], bag_size=s["bag_size"], limit=s["bags_per_patient"]
        )
        specs = [BagSpec(i, tiles) for tiles in bags]
        precision = resolve_precision(s.get("precision", "auto"), self.device)
        probabilities, attentions, routed = [], [], None
        for fold, (_, loader) in zip(self.folds, loaders):
            result = run_bags(
                fold.method,
                loader,
                specs,
                self.device,
                eval_batch=s["eval_batch"],
                precision=precision,
                attention=with_attention,
                routes=True,
            )
            bag_probabilities = result.probabilities[GIVEN]
            probabilities.append(reduce_bags(specs, bag_probabilities, i + 1, s["reduction"])[i])
            routed = result.routed[0] if result.routed else None
            if with_attention:
                attentions.append(_tile_attention(specs, result.attention, n))
        return self._patient_prediction(
            item,
            probabilities=probabilities,
            present=bool(encoded[0].present[i]),
            routed=routed,
            attentions=attentions,
            paths=[index.slides[k].coords_path for k in index.patients[i]],
            lengths=index.lengths(i),
            n_tiles=n,
            clinical_missing=clinical_missing,
        )


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
