"""End-to-end prediction: a method over bags of tiles, bag probabilities reduced per patient.

The papers' patient score is the mean of its bags' probabilities (the BCNB authors' code: mean
over every bag of the patient; ``max`` is its other option). Each batch of bags can be run with
the clinical data as given and again with it withheld; the second pass reuses the first's
encoded tiles (``remember_encodings``), so a method with one backbone runs it once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bidistill.devices import autocast, resolve_precision
from bidistill.models.batch import Batch
from bidistill.models.patch_encoder import encoded_aggregators, remember_encodings
from bidistill.models.streaming import routed_aggregator
from bidistill.training.data import withhold_clinical
from bidistill.training.tile_bags import BagSpec, prediction_bags

GIVEN, WITHHELD = "given", "withheld"


@dataclass
class BagRun:
    """Per patient: P(label = 1) (K > 2 classes: each class's) per pass and, when asked,
    attention over its tiles."""

    probabilities: dict[str, np.ndarray]  # pass (given/withheld) → [patients] or [patients, K]
    # Per patient, every aggregator's weight per tile (not only the predicting one's).
    attention: list[dict[str, np.ndarray]] = field(default_factory=list)
    routed: list[str | None] = field(default_factory=list)  # the aggregator that predicted


@torch.no_grad()
def predict_patients(
    method: nn.Module,
    loader,
    patients: Sequence[tuple[int, str]],
    settings: Mapping[str, Any],
    device: torch.device,
    *,
    passes: Sequence[str] = (GIVEN,),
    attention: bool = False,
    routes: bool = False,
) -> BagRun:
    """Run ``method`` (in eval mode) over the bags of ``patients`` ((item in ``loader``'s
    dataset, patient id); results in this order), each patient's bag probabilities reduced as
    ``settings`` (a run's ``end_to_end`` block) says. ``attention``: keep every aggregator's
    attention (given pass); ``routes``: say which aggregator predicted."""
    tiles = loader.dataset.tiles
    specs = [
        BagSpec(item, bag)
        for item, patient_id in patients
        for bag in prediction_bags(
            tiles.n_tiles(item),
            patient_id,
            seed=settings["seed"],
            bag_size=settings["bag_size"],
            limit=settings["bags_per_patient"],
        )
    ]
    precision = resolve_precision(settings.get("precision", "auto"), device)
    was_training = method.training
    method.eval()
    size = settings["eval_batch"]
    loader.batch_sampler.set_plan([specs[i : i + size] for i in range(0, len(specs), size)])
    out = {p: np.zeros((len(specs), *method.score_shape), np.float32) for p in passes}
    result = BagRun(out)
    bag_attention: list[dict[str, np.ndarray]] = []
    capture = _AttentionCapture(method, complete=attention) if attention or routes else None
    start = 0
    try:
        with remember_encodings(method), autocast(device, precision):
            for collated in loader:
                batch = collated.to(device, non_blocking=True)
                n = len(batch)
                for name in passes:
                    blank = name != GIVEN
                    given = withhold_clinical(batch, method.blank_clinical) if blank else batch
                    if capture is not None and name == GIVEN:
                        capture.start()
                    output = method(given)
                    out[name][start : start + n] = output.probabilities.float().cpu().numpy()
                    if capture is not None and name == GIVEN:
                        result.routed += capture.finish(given, output, bag_attention)
                start += n
    finally:
        if capture is not None:
            capture.remove()
        method.train(was_training)
    items = [item for item, _ in patients]
    result.probabilities = {
        name: _reduce(specs, p, items, settings["reduction"]) for name, p in out.items()
    }
    if attention:
        for item in items:
            mine = [(s, a) for s, a in zip(specs, bag_attention) if s.item == item]
            result.attention.append(_tile_attention(mine, tiles.n_tiles(item)))
    return result


class _AttentionCapture:
    """Every aggregator's attention over each bag of a batch (forward hooks; an aggregator the
    forward pass did not use, e.g. BD's other branch, is run on the batch directly)."""

    def __init__(self, method: nn.Module, *, complete: bool) -> None:
        self.modules = encoded_aggregators(method)
        self.complete = complete  # False: only which aggregator predicted
        self.seen: dict[str, Tensor] = {}
        self.handles = [
            module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()
        ]

    def _hook(self, name: str):
        def hook(_module, _inputs, output) -> None:
            self.seen[name] = output.attention

        return hook

    def start(self) -> None:
        self.seen = {}

    def finish(self, batch: Batch, output, attention: list) -> list[str | None]:
        """Which aggregator predicted each bag; each bag's attention appended to ``attention``."""
        routed = routed_aggregator(output.attention, self.seen)
        counts = batch.tile_valid.sum(dim=1).tolist()
        if self.complete:
            for name, module in self.modules.items():
                if name not in self.seen:
                    module(batch.bags, batch.tile_valid)  # fills self.seen through the hook
            for b, n in enumerate(counts):
                attention.append(
                    {name: w[b, :n].float().cpu().numpy() for name, w in self.seen.items()}
                )
        return [routed] * len(counts)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _reduce(
    specs: Sequence[BagSpec], probabilities: np.ndarray, items: Sequence[int], reduction: str
) -> np.ndarray:
    """Each patient's probability from its bags' (``mean``, ``max`` or ``median``); with K > 2
    classes per class, then scaled to sum to 1 (a max or median of each class's need not)."""
    per_item: dict[int, list[np.ndarray]] = {item: [] for item in items}
    for spec, p in zip(specs, probabilities):
        per_item[spec.item].append(np.asarray(p, dtype=np.float64))
    reduce = {"mean": np.mean, "max": np.max, "median": np.median}[reduction]
    blank = np.full(probabilities.shape[1:], np.nan)
    reduced = np.array([reduce(v, axis=0) if v else blank for v in per_item.values()])
    if reduced.ndim == 2:
        reduced /= reduced.sum(axis=1, keepdims=True)
    return reduced


def _tile_attention(bags: Sequence[tuple[BagSpec, dict[str, np.ndarray]]], n_tiles: int) -> dict:
    """Per aggregator, each tile's weight over the patient: its weight in its bag times the
    bag's size over the patient's tile count (a patient's weights sum to 1, as in feature mode;
    NaN for a tile in no bag)."""
    names = bags[0][1].keys() if bags else []
    out = {name: np.full(n_tiles, np.nan) for name in names}
    for spec, weights in bags:
        if not spec.tiles:
            continue
        scale = len(spec.tiles) / n_tiles
        for name, w in weights.items():
            out[name][list(spec.tiles)] = w * scale
    return out
