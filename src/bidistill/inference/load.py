"""Loading a trained run for prediction: its methods' folders (weights, options, the fitted
clinical encoder, the decision thresholds) through the run folder's owner (``runs.rundir``),
and the run's bag source, chosen here once: feature files, or tiles for an end-to-end run.

A checkpoint written by a newer bidistill is refused: its options or layers may mean something
this version does not know. A method is loaded only when its training finished on every fold.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bidistill import __version__
from bidistill.cohort import ClinicalEncoder
from bidistill.config import ExperimentConfig, load_config
from bidistill.errors import BidistillError, CheckpointError, ConfigError
from bidistill.inference.feature_source import FeatureSource
from bidistill.inference.tile_source import TileSource
from bidistill.inference.trained_run import FoldModel, TrainedRun
from bidistill.models import Method, create_method
from bidistill.runs.rundir import MethodDir, RunDir, reason
from bidistill.thresholds import FALLBACK_THRESHOLD, youden_threshold

log = logging.getLogger(__name__)

# What a method's options file (``MethodDir.meta``) must hold to rebuild it.
_META_KEYS = (
    "method",
    "options",
    "dims",
    *(f"dims.{k}" for k in ("in_dim", "clinical_dim", "n_clinical_features", "feature_slices")),
)


def load_run(
    run_dir: str | Path,
    method: str | None = None,
    *,
    config: str | Path | None = None,
    device: str = "auto",
) -> TrainedRun:
    """Load a trained method of a run directory for prediction.

    Args:
        method: the method's folder name; default: the config's reference method (``bd``)
            when it was trained, else the first trained method of the config.
        config: the experiment YAML; default: the run's own copy (pass it for a run made by
            ``bidistill train``).
        device: ``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda``, ...

    Raises:
        CheckpointError: no such run or method, one trained by a newer bidistill or not
            finished on every fold, or a damaged file (each named, with the fix).
        ConfigError: no config to read the table layout from.
    """
    from bidistill.devices import resolve_device

    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise CheckpointError(f"{run.path}: run directory not found")
    cfg = _run_config(run, config)
    trained = run.trained_methods()
    if not trained:
        raise CheckpointError(
            f"{run.path}: no trained method (no {MethodDir('<method>').weights}); train with "
            "`bidistill run`"
        )
    key = method or _default_method(cfg, trained)
    if key not in trained:
        raise CheckpointError(
            f"{run.path}: no trained method '{key}'; trained: {', '.join(sorted(trained))}"
        )
    _check_finished(run, key, trained[key], config)
    torch_device = resolve_device(device)
    folds = []
    for method_dir in trained[key]:
        model, encoder, meta = load_trained(method_dir, device=torch_device)
        thresholds = decision_thresholds(method_dir, cfg)
        folds.append(FoldModel(method_dir, model, encoder, meta, thresholds))
    first = folds[0]
    if first.meta.get("end_to_end"):  # trained on tiles: predicts from tiles
        source = TileSource(cfg, first.meta, key)
    else:
        source = FeatureSource(cfg, first.meta, first.method_dir.meta)
    return TrainedRun(run.path, key, cfg, folds, torch_device, source)


def load_trained(
    method_dir: str | Path | MethodDir, *, device: str | torch.device = "cpu"
) -> tuple[Method, ClinicalEncoder, dict[str, Any]]:
    """(method in ``eval()`` mode, its fitted clinical encoder, its options); a missing,
    unreadable or newer checkpoint raises ``CheckpointError``."""
    folder = MethodDir(method_dir)
    for path in (folder.weights, folder.meta, folder.clinical_encoder):
        if not path.is_file():  # every file named before any is read
            raise CheckpointError(f"{path}: missing; train the method with `bidistill train`")
    meta = folder.read_meta(required=_META_KEYS)
    saved = str(meta.get("bidistill_version", "0"))
    if _version_tuple(saved) > _version_tuple(__version__):
        raise CheckpointError(
            f"{folder.meta}: written by bidistill {saved}, newer than this bidistill "
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
            n_classes=dims.get("n_classes", 2),  # runs before multi-class labels: binary
            patch_encoder=_patch_encoders(meta),
            **meta["options"],
        )
    except (BidistillError, KeyError, TypeError, ValueError) as err:
        raise folder.damaged(folder.meta, f"cannot rebuild the method ({reason(err)})") from err
    state = folder.read_weights()
    try:
        method.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise folder.damaged(
            folder.weights, f"does not fit {meta['method']} ({reason(err)})"
        ) from err
    method.set_stage(method.stages()[-1].name)
    try:
        encoder = ClinicalEncoder.load(folder.clinical_encoder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise folder.damaged(folder.clinical_encoder, f"unreadable ({reason(err)})") from err
    return method.to(device).eval(), encoder, meta


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _patch_encoders(meta: dict[str, Any]):
    block = meta.get("end_to_end")
    if not block:
        return None
    from bidistill.training.backbone import BackboneSpec, architecture_factory

    return architecture_factory(BackboneSpec.from_dict(block["backbone"]))


def decision_thresholds(
    method_dir: str | Path | MethodDir, cfg: ExperimentConfig
) -> dict[str, float]:
    """The method's decision thresholds, with clinical data (``present``) and without
    (``absent``), chosen on its validation patients as the evaluation does."""
    fixed = cfg.evaluation.threshold
    if cfg.cohort.label.n_classes > 2:  # the class of highest probability: no threshold
        return {"present": float("nan"), "absent": float("nan")}
    if not isinstance(fixed, str):
        return {"present": float(fixed), "absent": float(fixed)}
    folder = MethodDir(method_dir)
    saved = folder.read_predictions()
    try:
        val = saved[saved["split"] == "val"]
        labels = val["label"].to_numpy()
        present = val["prob_present"].to_numpy(np.float64)
        absent = val["prob_absent"].to_numpy(np.float64)
    except (ValueError, KeyError) as err:
        raise folder.damaged(folder.predictions, f"unreadable ({reason(err)})") from err
    if val["label"].nunique() < 2:
        log.warning(
            "%s: no validation patients of both classes; decisions use threshold %.1f",
            folder.predictions,
            FALLBACK_THRESHOLD,
        )
        return {"present": FALLBACK_THRESHOLD, "absent": FALLBACK_THRESHOLD}
    return {
        "present": youden_threshold(labels, present),
        "absent": youden_threshold(labels, absent),
    }


def _run_config(run: RunDir, config: str | Path | None) -> ExperimentConfig:
    if config is not None:
        return load_config(config)
    if run.config.is_file():
        return load_config(run.config)
    raise ConfigError(
        f"{run.path}: no {run.config.name} (a run made by `bidistill train`); give the "
        "experiment config it was trained with (--config)"
    )


def _check_finished(
    run: RunDir, method: str, method_dirs: list[MethodDir], config: str | Path | None
) -> None:
    """Refuse a method whose training stopped part way: a k-fold run predicts with the mean of
    every fold's model, so a run killed after some folds would quietly predict with fewer."""
    expected = run.fold_count()
    done = {d.fold for d in method_dirs if d.done}
    missing = [k for k in range(expected) if k not in done]
    if not missing:
        return
    config_path = Path(config) if config is not None else run.config
    finish = f"bidistill run {shlex.quote(str(config_path))} --out {shlex.quote(str(run.path))}"
    if expected == 1:
        unfinished = run.joined(method)
        what = f"{unfinished.path}: training did not finish (no {unfinished.predictions.name})"
    else:
        names = ", ".join(run.fold_root(k, expected).name for k in missing)
        what = (
            f"{run.path}: {method} is trained on {expected - len(missing)} of {expected} folds "
            f"({names} not finished), and a k-fold run predicts with the mean of all its folds"
        )
    raise CheckpointError(f"{what}; finish the run with `{finish}`")


def _default_method(cfg: ExperimentConfig, trained: dict[str, list[MethodDir]]) -> str:
    reference = cfg.evaluation.reference_method
    if reference in trained:
        return reference
    for method in cfg.methods:
        if method.key in trained:
            return method.key
    return sorted(trained)[0]
