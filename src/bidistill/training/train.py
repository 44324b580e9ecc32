"""``train_method``: one method, one fold, from a cohort and its bags to a method's files, for
both modes (the bag source, ``training.bag_source``, is what differs). Every statistic (clinical
encoding, class weights, model selection) comes from the training and validation patients only."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from bidistill import __version__
from bidistill._text import count
from bidistill.cohort import ClinicalEncoder, Cohort, Splits, check_separating_features
from bidistill.config import ExperimentConfig, MethodConfig
from bidistill.devices import resolve_device
from bidistill.features.store import FeatureStore
from bidistill.models import Method, create_method
from bidistill.models.registry import resolved_options
from bidistill.scores import probability_columns
from bidistill.training.bag_source import BagSource
from bidistill.training.distributed import (
    Processes,
    barrier,
    broadcast_parameters,
    start_processes,
)
from bidistill.training.feature_source import open_feature_source
from bidistill.training.loop import FitResult, TrainingDivergedError, fit, remove_state
from bidistill.training.seeding import seed_everything
from bidistill.training.tile_source import TileSource

log = logging.getLogger(__name__)


class MethodFiles(Protocol):
    """Where a trained method's files go (``runs.rundir.MethodDir`` is one)."""

    training_state: Path

    def save(self, *, state_dict, meta, encoder, train_log, predictions) -> None: ...


def class_weights(labels: np.ndarray, n_classes: int = 2) -> torch.Tensor:
    """Inverse class frequency, n / (K n_c), so every class weighs the same in total."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(labels) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def train_method(
    config: ExperimentConfig,
    method_cfg: MethodConfig,
    out: MethodFiles,
    *,
    cohort: Cohort,
    splits: Splits,
    fold: int = 0,
    store: FeatureStore | None = None,
    progress: bool = True,
) -> None:
    """Train one method on one fold and hand its files to ``out`` (under torchrun every process
    trains and process 0 saves; ``store``: feature files already opened, shared by methods).

    Raises:
        ConfigError: unknown method or option. CohortError: a separating clinical feature.
        FeatureFileError, SlideError: missing or inconsistent feature files, slides or tiles.
        TrainingDivergedError: a loss, or a prediction, not finite (nothing is saved).
    """
    started = time.perf_counter()
    tcfg = config.training
    chosen = splits.folds[fold]
    split_ids = {"train": list(chosen.train), "val": list(chosen.val), "test": list(splits.test)}
    device = resolve_device(tcfg.device)
    processes = start_processes(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    train_rows = cohort.subset(split_ids["train"])
    check_separating_features(
        train_rows[cohort.feature_names],
        train_rows["label"],
        cohort.columns,
        config.cohort.allow_separating,
    )
    encoder = ClinicalEncoder(cohort.columns).fit(train_rows[cohort.feature_names])
    source = open_bag_source(
        config,
        cohort,
        split_ids,
        encoder,
        store=store,
        processes=processes,
        device=device,
        progress=progress,
    )
    seed_everything(tcfg.seed)
    encoders = {"patch_encoder": source.patch_encoder} if source.patch_encoder else {}
    method = create_method(
        method_cfg.name,
        in_dim=source.in_dim,
        clinical_dim=encoder.n_outputs_,
        n_clinical_features=encoder.n_features_,
        feature_slices=encoder.feature_slices_,
        n_classes=config.cohort.label.n_classes,
        **encoders,
        **method_cfg.options,
    )
    method.set_blank_clinical(torch.from_numpy(encoder.missing_row().values[0]))
    if tcfg.class_weighting:
        labels = train_rows["label"].to_numpy(np.int64)
        method.set_class_weights(class_weights(labels, method.n_classes))
    method.to(device)
    source.start(method, device)
    broadcast_parameters(method, processes)
    state_file = out.training_state if source.resumable else None
    try:
        with source.cpu_threads(method, device):
            result = fit(
                method,
                source,
                tcfg,
                device=device,
                progress=progress,
                processes=processes,
                precision=source.precision,
                state_file=state_file,
                fingerprint=_fingerprint(config, method_cfg, cohort, split_ids, source),
            )
            predictions = predictions_table(method, source, fold)
        if processes.is_main:
            refuse_non_finite(predictions, method_cfg.key)
            meta = _meta(method, source, result, config, fold, split_ids, started)
            out.save(
                state_dict=method.state_dict(),
                meta=meta,
                encoder=encoder,
                train_log=pd.DataFrame(result.log_rows),
                predictions=predictions,
            )
            if state_file is not None:
                remove_state(state_file)
            log.info("%s: trained in %.1f s", method_cfg.key, time.perf_counter() - started)
        barrier(processes)
    finally:
        source.close()


def predictions_table(method: Method, source: BagSource, fold: int) -> pd.DataFrame:
    """``predictions.csv``: per patient of every split its label and P(label = 1) with its
    clinical data as given (``prob_present``) and withheld (``prob_absent``); with K > 2
    classes each class's (``prob_present_0`` … ``prob_absent_<K-1>``)."""
    frames = []
    for split, patients in source.patients.items():
        given, withheld = source.probabilities(method, split, final=True)
        columns = {
            "patient_id": patients.ids,
            "split": split,
            "fold": fold,
            "label": patients.labels,
            "clinical_available": patients.clinical_present,
        }
        for pass_, scores in (("present", given), ("absent", withheld)):
            names = probability_columns(pass_, method.n_classes)
            columns |= dict(zip(names, np.asarray(scores).reshape(len(patients.ids), -1).T))
        frames.append(pd.DataFrame(columns))
    return pd.concat(frames, ignore_index=True)


def refuse_non_finite(predictions: pd.DataFrame, key: str) -> None:
    """A method whose predictions hold NaN is never saved, so it is not marked done and a
    rerun trains it again instead of evaluating NaN."""
    probabilities = predictions.filter(regex="^prob_").to_numpy()
    bad = ~np.isfinite(probabilities).all(axis=1)
    if bad.any():
        patients = predictions.loc[bad, "patient_id"].tolist()
        shown = ", ".join(map(str, patients[:5])) + (", …" if len(patients) > 5 else "")
        raise TrainingDivergedError(
            f"{key}: predictions are NaN for {len(patients)} of "
            f"{count(len(bad), 'patient')} ({shown}); nothing is saved, so the method is not "
            "done: check those patients' feature files, or lower training.lr"
        )


def _meta(method: Method, source: BagSource, result: FitResult, config, fold, split_ids, started):
    """``model.json``: everything needed to rebuild the method and to know how it was trained
    (a checkpoint of a newer bidistill is refused when loaded)."""
    dims = method.dims
    return {
        "bidistill_version": __version__,
        "method": method.name,
        "options": method.options.model_dump(mode="json"),
        "dims": {
            "in_dim": dims.in_dim,
            "clinical_dim": dims.clinical_dim,
            "n_clinical_features": dims.n_clinical_features,
            "feature_slices": [list(s) for s in dims.feature_slices],
            "n_classes": dims.n_classes,
        },
        "fold": fold,
        "selection": [stage.to_dict() for stage in result.stages],
        "training": config.training.model_dump(mode="json"),
        **source.meta(),
        "patients": split_ids,
        "train_seconds": round(time.perf_counter() - started, 2),
    }


def _fingerprint(config, method_cfg, cohort: Cohort, split_ids, source: BagSource) -> str:
    """What decides the weights, so that a kept training state is resumed only by the training
    it belongs to: the settings, the method, the patients' rows, and the source's part (e.g.
    the starting weights and the tiles). Left out on purpose: the device, the loader workers
    and the number of processes, which change nothing."""
    patients = [p for ids in split_ids.values() for p in ids]
    rows = cohort.subset(patients)[["label", *cohort.feature_names]]
    slides = cohort.slides.sort_values(["patient_id", "slide_id"])[["patient_id", "slide_id"]]
    data: dict[str, Any] = {
        "training": config.training.model_dump(mode="json", exclude={"num_workers", "device"}),
        "method": method_cfg.model_dump(mode="json"),
        "options": resolved_options(method_cfg.name, method_cfg.options),  # defaults included
        "patients": split_ids,
        "rows": rows.to_csv(),
        "slides": slides[slides["patient_id"].isin(patients)].to_csv(index=False),
        "source": source.fingerprint(),
    }
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def open_bag_source(
    config: ExperimentConfig,
    cohort: Cohort,
    split_ids: dict[str, list[str]],
    encoder: ClinicalEncoder,
    *,
    store: FeatureStore | None,
    processes: Processes,
    device: torch.device,
    progress: bool,
) -> BagSource:
    """The bag source of ``config.training.mode`` (the one place the mode is decided)."""
    if config.training.on_tiles:
        return TileSource(config, cohort, split_ids, encoder, processes, device)
    return open_feature_source(config, cohort, split_ids, encoder, store=store, progress=progress)
