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
from safetensors import SafetensorError
from safetensors.torch import load_file

from bidistill import __version__
from bidistill.cohort import ClinicalEncoder
from bidistill.config import ExperimentConfig
from bidistill.errors import BidistillError, CheckpointError
from bidistill.models import Method, create_method
from bidistill.runs.rundir import MethodDir

log = logging.getLogger(__name__)

_NAMES = MethodDir("")  # the file names, as the run folder spells them
WEIGHTS, META = _NAMES.weights.name, _NAMES.meta.name
ENCODER, PREDICTIONS = _NAMES.clinical_encoder.name, _NAMES.predictions.name


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
    meta = _read_meta(method_dir / META)
    saved = str(meta.get("bidistill_version", "0"))
    if _version_tuple(saved) > _version_tuple(__version__):
        raise CheckpointError(
            f"{method_dir / META}: written by bidistill {saved}, newer than this bidistill "
            f"{__version__}; upgrade bidistill to load it"
        )
    dims = meta["dims"]
    try:
        method = create_method(
            meta["method"],
            in_dim=dims["in_dim"],
            clinical_dim=dims["clinical_dim"],
            n_clinical_features=dims["n_clinical_features"],
            feature_slices=dims["feature_slices"],
            patch_encoder=_patch_encoders(meta),
            **meta["options"],
        )
    except (BidistillError, KeyError, TypeError, ValueError) as err:
        raise _damaged(method_dir / META, f"cannot rebuild the method ({_reason(err)})") from err
    try:
        state = load_file(str(method_dir / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise _damaged(method_dir / WEIGHTS, f"unreadable ({_reason(err)})") from err
    try:
        method.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise _damaged(
            method_dir / WEIGHTS, f"does not fit {meta['method']} ({_reason(err)})"
        ) from err
    stages = [s.name for s in method.stages()]
    method.set_stage(stages[-1])
    try:
        encoder = ClinicalEncoder.load(method_dir / ENCODER)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise _damaged(method_dir / ENCODER, f"unreadable ({_reason(err)})") from err
    return method.to(device).eval(), encoder, meta


# What ``model.json`` must hold to rebuild the method (the trainer writes them all).
_META_KEYS = ("method", "options", "dims")
_DIMS_KEYS = ("in_dim", "clinical_dim", "n_clinical_features", "feature_slices")


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path, f"not valid JSON ({_reason(err)})") from err
    if not isinstance(meta, dict):
        raise _damaged(path, "not a JSON object")
    missing = [k for k in _META_KEYS if k not in meta]
    dims = meta.get("dims")
    if isinstance(dims, dict):
        missing += [f"dims.{k}" for k in _DIMS_KEYS if k not in dims]
    elif "dims" not in missing:
        missing.append("dims")
    if missing:
        raise _damaged(path, f"lacks {', '.join(missing)}")
    return meta


def _damaged(path: Path, problem: str) -> CheckpointError:
    """A damaged checkpoint file: the method has to be trained again."""
    return CheckpointError(
        f"{path}: {problem}; the file is damaged: delete the folder {path.parent} and rerun "
        "`bidistill run CONFIG --out RUN` to train it again"
    )


def _reason(err: BaseException) -> str:
    """An exception as a short phrase (KeyError's message is only the key)."""
    text = " ".join(str(err).split())
    if isinstance(err, KeyError):
        return f"no {text}"
    return text[:200] or type(err).__name__


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
    path = method_dir / PREDICTIONS
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the method's training did not finish")
    try:
        saved = pd.read_csv(path, dtype={"patient_id": str})
        val = saved[saved["split"] == "val"]
        labels = val["label"].to_numpy()
        present = val["prob_present"].to_numpy(np.float64)
        absent = val["prob_absent"].to_numpy(np.float64)
    except (OSError, ValueError, KeyError) as err:  # pandas' parser errors are ValueErrors
        raise _damaged(path, f"unreadable ({_reason(err)})") from err
    if val["label"].nunique() < 2:
        log.warning(
            "%s: no validation patients of both classes; decisions use threshold %.1f",
            path,
            FALLBACK_THRESHOLD,
        )
        return {"present": FALLBACK_THRESHOLD, "absent": FALLBACK_THRESHOLD}
    return {
        "present": youden_threshold(labels, present),
        "absent": youden_threshold(labels, absent),
    }
