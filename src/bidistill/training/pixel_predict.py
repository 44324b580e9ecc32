"""End-to-end prediction: a method over bags of tiles, bag probabilities reduced per patient.

The papers' patient score is the mean of its bags' probabilities (the BCNB authors' code: mean
over every bag of the patient; ``max`` is its other option). Each batch of bags can be run with
the clinical data as given and again with it withheld; the second pass reuses the first's
encoded tiles (``remember_encodings``), so a method with one backbone runs it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from bidistill.devices import autocast
from bidistill.models.batch import Batch
from bidistill.models.patch_encoder import encoded_aggregators, remember_encodings
from bidistill.models.streaming import routed_aggregator
from bidistill.training.data import withhold_clinical
from bidistill.training.pixel_bags import BagSpec

GIVEN, WITHHELD = "given", "withheld"


@dataclass
class BagRun:
    """Per bag, in the order given: P(label = 1) per pass and, when asked, attention."""

    probabilities: dict[str, np.ndarray]  # pass (given/withheld) → float [n_bags]
    # Per bag, every aggregator's weights over its tiles (not only the predicting one's).
    attention: list[dict[str, np.ndarray]] = field(default_factory=list)
    routed: list[str | None] = field(default_factory=list)  # the aggregator that predicted


@torch.no_grad()
def run_bags(
    method: nn.Module,
    loader,
    specs: Sequence[BagSpec],
    device: torch.device,
    *,
    eval_batch: int,
    precision: torch.dtype = torch.float32,
    passes: Sequence[str] = (GIVEN,),
    attention: bool = False,
    routes: bool = False,
) -> BagRun:
    """Run ``method`` (in eval mode) over the bags ``specs`` read by ``loader``.

    ``loader``: a ``pixel_loader`` (its batches are set here); ``attention``: keep every
    aggregator's attention per bag (given pass); ``routes``: say which aggregator predicted.
    """
    was_training = method.training
    method.eval()
    batches = [list(specs[i : i + eval_batch]) for i in range(0, len(specs), eval_batch)]
    loader.batch_sampler.set_plan(batches)
    out = {p: np.zeros(len(specs), np.float32) for p in passes}
    result = BagRun(out)
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
                        capture.finish(given, output, result)
                start += n
    finally:
        if capture is not None:
            capture.remove()
        method.train(was_training)
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

    def finish(self, batch: Batch, output, result: BagRun) -> None:
        routed = routed_aggregator(output.attention, self.seen)
        counts = batch.tile_valid.sum(dim=1).tolist()
        result.routed += [routed] * len(counts)
        if not self.complete:
            return
        for name, module in self.modules.items():
            if name not in self.seen:
                module(batch.bags, batch.tile_valid)  # fills self.seen through the hook
        for b, n in enumerate(counts):
            result.attention.append(
                {name: w[b, :n].float().cpu().numpy() for name, w in self.seen.items()}
            )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def reduce_bags(
    specs: Sequence[BagSpec], probabilities: np.ndarray, n_items: int, reduction: str
) -> np.ndarray:
    """Each patient's probability from its bags' (``mean``, ``max`` or ``median``)."""
    per_item: list[list[float]] = [[] for _ in range(n_items)]
    for spec, p in zip(specs, probabilities):
        per_item[spec.item].append(float(p))
    reduce = {"mean": np.mean, "max": np.max, "median": np.median}[reduction]
    return np.array([reduce(v) if v else np.nan for v in per_item], dtype=np.float64)
