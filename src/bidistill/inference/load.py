"""Loading a trained method folder: weights, options and the fitted clinical encoder.

A checkpoint written by a newer bidistill is refused: its options or layers may mean something
this version does not know.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from bidistill import __version__
from bidistill.cohort import ClinicalEncoder
from bidistill.config import ExperimentConfig
from bidistill.errors import CheckpointError
from bidistill.models import Method, create_method
from bidistill.training.checkpoint import ENCODER, META, WEIGHTS

log = logging.getLogger(__name__)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def load_trained(
    method_dir: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[Method, ClinicalEncoder, dict[str, Any]]:
    """Rebuild a trained method in ``eval()`` mode with its fitted clinical encoder.

    Returns:
        (method, encoder, meta): ``meta`` is the content of ``model.json``.

    Raises:
        CheckpointError: a file is missing or unreadable, or the checkpoint comes from a newer
            bidistill.
    """
    method_dir = Path(method_dir)
    for name in (WEIGHTS, META, ENCODER):
        if not (method_dir / name).is_file():
            raise CheckpointError(
                f"{method_dir / name}: missing; train the method with `bidistill train`"
            )
    try:
        meta = json.loads((method_dir / META).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{method_dir / META}: not valid JSON ({err})") from err
    saved = str(meta.get("bidistill_version", "0"))
    if _version_tuple(saved) > _version_tuple(__version__):
        raise CheckpointError(
            f"{method_dir / META}: written by bidistill {saved}, newer than this bidistill "
            f"{__version__}; upgrade bidistill to load it"
        )
    dims = meta["dims"]
    method = create_method(
        meta["method"],
        in_dim=dims["in_dim"],
        clinical_dim=dims["clinical_dim"],
        n_clinical_features=dims["n_clinical_features"],
        feature_slices=dims["feature_slices"],
        patch_encoder=_patch_encoders(meta),
        **meta["options"],
    )
    try:
        state = load_file(str(method_dir / WEIGHTS))
        method.load_state_dict(state, strict=True)
    except (RuntimeError, OSError) as err:
        raise CheckpointError(
            f"{method_dir / WEIGHTS}: does not fit {meta['method']} ({err})"
        ) from err
    stages = [s.name for s in method.stages()]
    method.set_stage(stages[-1])
    encoder = ClinicalEncoder.load(method_dir / ENCODER)
    return method.to(device).eval(), encoder, meta


def _patch_encoders(meta: dict[str, Any]):
    """End-to-end runs (issue 13): the patch encoders' architecture, weights to be loaded."""
    block = meta.get("end_to_end")
    if not block:
        return None
    from bidistill.training.backbone import BackboneSpec, architecture_factory

    return architecture_factory(BackboneSpec.from_dict(block["backbone"]))


FALLBACK_THRESHOLD = 0.5


def decision_thresholds(method_dir: Path, cfg: ExperimentConfig) -> dict[str, float]:
    """The method's decision thresholds, with clinical data (``present``) and without
    (``absent``), chosen on its validation patients as the evaluation does."""
    from bidistill.evaluation.metrics import youden_threshold

    fixed = cfg.evaluation.threshold
    if not isinstance(fixed, str):
        return {"present": float(fixed), "absent": float(fixed)}
    path = method_dir / "predictions.csv"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the method's training did not finish")
    saved = pd.read_csv(path, dtype={"patient_id": str})
    val = saved[saved["split"] == "val"]
    if val["label"].nunique() < 2:
        log.warning(
            "%s: no validation patients of both classes; decisions use threshold %.1f",
            path,
            FALLBACK_THRESHOLD,
        )
        return {"present": FALLBACK_THRESHOLD, "absent": FALLBACK_THRESHOLD}
    labels = val["label"].to_numpy()
    return {
        "present": youden_threshold(labels, val["prob_present"].to_numpy(np.float64)),
        "absent": youden_threshold(labels, val["prob_absent"].to_numpy(np.float64)),
    }
