"""The state of end-to-end training on disk: ``<method>/training_state.pt``.

Written atomically at every epoch boundary (weights, optimiser, scheduler, gradient scaler, best
weights so far, early-stopping counters, log) and read back by a rerun when its fingerprint (the
settings, the method, the patients' rows, the starting weights, the tiles) is the run's, so a
killed run resumes at its last epoch boundary and ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bidistill._io import atomic_path, remove_temp_files
from bidistill.training.backbone import BackboneSpec

log = logging.getLogger(__name__)

STATE = "training_state.pt"


@dataclass
class TrainingState:
    """What ``training_state.pt`` holds besides the tensors: where training is, and its log."""

    fingerprint: str
    stage: int = 0  # index of the stage in training (== number of stages: all done)
    epoch: int = 0  # next epoch of that stage
    global_epoch: int = 0  # epochs run over all stages (draws the bags)
    best_epoch: int = -1
    best_score: float = -math.inf
    stale: int = 0
    parts: dict[str, dict] = field(default_factory=dict)  # per part: best epoch, score, stale
    log_rows: list[dict] = field(default_factory=list)
    stage_results: list[dict] = field(default_factory=list)


def fingerprint(config, method_cfg, cohort, split_ids, spec: BackboneSpec) -> str:
    """What decides the weights: the settings, the method, the patients' rows, the starting
    weights. Left out on purpose: the device, the loader workers and the number of processes,
    which change nothing."""
    from bidistill.runs.inputs import cohort_rows

    patients = [p for ids in split_ids.values() for p in ids]
    data = {
        "training": config.training.model_dump(mode="json", exclude={"num_workers", "device"}),
        "method": method_cfg.model_dump(mode="json"),
        "patients": split_ids,
        "rows": cohort_rows(cohort, patients),
        "backbone": spec.to_dict(),
    }
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def tiles_digest(slides) -> str:
    """The tiles the bags are drawn from (every slide's coordinates)."""
    digest = hashlib.sha256()
    for slide in slides:
        digest.update(slide.slide_id.encode())
        digest.update(np.ascontiguousarray(slide.coords).tobytes())
    return digest.hexdigest()[:12]


def save_state(
    path: Path, state: TrainingState, method, optimizer, scheduler, scaler, best
) -> None:
    payload = {
        "state": state.__dict__,
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "best": best,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def remove_state(method_dir: Path) -> None:
    """Training is done: remove its state, and the partial copies that a process killed while
    saving it left (each as large as the weights and the optimiser together)."""
    path = Path(method_dir) / STATE
    path.unlink(missing_ok=True)
    for leftover in remove_temp_files(path):
        log.info("removed %s, left by a killed save", leftover)


def load_state(path: Path, fingerprint: str, device: torch.device) -> dict | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a damaged file costs a restart, never a wrong resume
        log.warning("%s: unreadable (%s); training starts over", path, err)
        return None
    if payload.get("state", {}).get("fingerprint") != fingerprint:
        log.warning("%s: made with other settings, patients or weights; starting over", path)
        return None
    return payload
