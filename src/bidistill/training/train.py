"""``train_method``: one method, one fold, from a cohort and its feature files to a run folder.

Writes ``<run_dir>/<method>/``: ``model.safetensors``, ``model.json``, ``clinical_encoder.json``,
``train_log.csv`` and, last, ``predictions.csv`` (its existence means the method is done, so a
rerun skips it). Every statistic (clinical encoding, class weights, model selection) comes from
the training and validation patients only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bidistill._io import write_csv
from bidistill._text import count
from bidistill.cohort import (
    ClinicalEncoder,
    Cohort,
    Splits,
    check_separating_features,
)
from bidistill.config import ExperimentConfig, MethodConfig
from bidistill.features.identity import config_identity
from bidistill.features.store import FeatureStore
from bidistill.models import Method, create_method
from bidistill.training.bounded import (
    check_prediction_memory,
    prediction_loader,
    streaming_aggregation,
)
from bidistill.training.checkpoint import PREDICTIONS, save_checkpoint
from bidistill.training.data import PatientBags, StoreBags, bag_loader
from bidistill.training.loop import TrainingDivergedError, fit, predict_loader, resolve_device
from bidistill.training.seeding import seed_everything
from bidistill.training.threads import cpu_threads_for

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.csv"


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """Inverse class frequency, n / (2 n_c), so both classes weigh the same in total."""
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    return torch.tensor(len(labels) / (2 * np.maximum(counts, 1)), dtype=torch.float32)


def open_feature_store(
    config: ExperimentConfig, cohort: Cohort, *, progress: bool = False
) -> FeatureStore:
    """The cohort's feature files, in RAM when ``training.in_memory`` allows."""
    return FeatureStore(
        config.features.dir,
        cohort.slides["slide_id"].tolist(),
        in_memory=config.training.in_memory,
        progress=progress,
    )


@dataclass
class _Part:
    """The patients of one split with their encoded data."""

    ids: list[str]
    dataset: PatientBags


@dataclass
class _Setup:
    """Everything a method's training needs, fitted on the training patients only."""

    method: Method
    encoder: ClinicalEncoder
    parts: dict[str, _Part]  # train, val, test
    device: torch.device


def train_method(
    config: ExperimentConfig,
    method_cfg: MethodConfig,
    run_dir: str | Path,
    *,
    cohort: Cohort,
    splits: Splits,
    fold: int = 0,
    store: FeatureStore | None = None,
    progress: bool = True,
) -> Path:
    """Train one method on one fold and write its folder (see the module docstring).

    Args:
        config: the experiment; ``config.training`` gives the optimiser, epochs and seed.
        method_cfg: the method's name and options.
        run_dir: the run folder; the method writes ``run_dir/<method_cfg.key>/``.
        store: feature files already opened (several methods on one cohort share one).
        progress: show a progress bar per epoch.

    Returns:
        The method's folder.

    Raises:
        ConfigError: unknown method or option. CohortError: a separating clinical feature.
        FeatureFileError: missing or inconsistent feature files.
    """
    method_dir = Path(run_dir) / method_cfg.key
    if (method_dir / PREDICTIONS).is_file():
        log.info("%s: done already (%s exists), skipped", method_cfg.key, PREDICTIONS)
        return method_dir
    if config.training.mode == "end-to-end":  # bags of tiles, the encoder trains too (issue 13)
        from bidistill.training.end_to_end import train_end_to_end

        return train_end_to_end(
            config, method_cfg, run_dir, cohort=cohort, splits=splits, fold=fold, progress=progress
        )
    started = time.perf_counter()
    chosen = splits.folds[fold]
    split_ids = {"train": list(chosen.train), "val": list(chosen.val), "test": list(splits.test)}
    store = store or open_feature_store(config, cohort, progress=progress)
    setup = _set_up(config, method_cfg, cohort, split_ids, store)
    tcfg = config.training
    for part in setup.parts.values():  # before training: a bag too large to predict fails now
        check_prediction_memory(setup.method, part.dataset.bags.lengths(), store.dim, part.ids)
    train_loader = bag_loader(
        setup.parts["train"].dataset,
        tcfg.batch_size,
        shuffle=True,
        workers=tcfg.num_workers,
        seed=tcfg.seed,
    )
    val_loader = bag_loader(
        setup.parts["val"].dataset,
        tcfg.batch_size,
        shuffle=False,
        workers=tcfg.num_workers,
        seed=tcfg.seed,
    )
    val_labels = setup.parts["val"].dataset.labels.numpy()
    threads = cpu_threads_for(
        setup.method,
        setup.device,
        batch_size=tcfg.batch_size,
        bag_lengths=setup.parts["train"].dataset.lengths(),
    )
    with threads:
        result = fit(
            setup.method,
            train_loader,
            val_loader,
            val_labels,
            tcfg,
            device=setup.device,
            progress=progress,
        )
        predictions = _predict_all(setup, fold, tcfg.batch_size)
    meta = {
        "fold": fold,
        "selection": [stage.to_dict() for stage in result.stages],
        "training": tcfg.model_dump(mode="json"),
        "features": {
            "dir": str(config.features.dir),
            "encoder": config.features.encoder,
            "dim": store.dim,
            # What made the features (a later prediction refuses features of another kind).
            "identity": store.identity.filled_from(config_identity(config)).to_dict(),
        },
        "patients": split_ids,
        "train_seconds": round(time.perf_counter() - started, 2),
    }
    save_checkpoint(method_dir, setup.method, setup.encoder, meta)
    write_csv(method_dir / TRAIN_LOG, pd.DataFrame(result.log_rows))
    _refuse_non_finite(predictions, method_cfg.key, method_dir / PREDICTIONS)
    write_csv(method_dir / PREDICTIONS, predictions)  # last: marks the method as done
    log.info("%s: trained in %.1f s", method_cfg.key, time.perf_counter() - started)
    return method_dir


def _set_up(
    config: ExperimentConfig,
    method_cfg: MethodConfig,
    cohort: Cohort,
    split_ids: dict[str, list[str]],
    store: FeatureStore,
) -> _Setup:
    """Fit the clinical encoder on the training patients, build the method and the datasets."""
    tcfg = config.training
    train_rows = cohort.subset(split_ids["train"])
    check_separating_features(
        train_rows[cohort.feature_names],
        train_rows["label"],
        cohort.columns,
        config.cohort.allow_separating,
    )
    encoder = ClinicalEncoder(cohort.columns).fit(train_rows[cohort.feature_names])
    seed_everything(tcfg.seed)
    method = create_method(
        method_cfg.name,
        in_dim=store.dim,
        clinical_dim=encoder.n_outputs_,
        n_clinical_features=encoder.n_features_,
        feature_slices=encoder.feature_slices_,
        **method_cfg.options,
    )
    method.set_blank_clinical(torch.from_numpy(encoder.missing_row().values[0]))
    if tcfg.class_weighting:
        method.set_class_weights(class_weights(train_rows["label"].to_numpy(np.int64)))
    device = resolve_device(tcfg.device)
    method.to(device)
    parts = {
        name: _Part(
            ids,
            _patient_bags(
                cohort,
                ids,
                encoder,
                store,
                max_instances=tcfg.max_instances if name == "train" else None,
                instance_dropout=tcfg.instance_dropout if name == "train" else 0.0,
                seed=tcfg.seed,
            ),
        )
        for name, ids in split_ids.items()
    }
    return _Setup(method, encoder, parts, device)


def _patient_bags(
    cohort: Cohort,
    ids: list[str],
    encoder: ClinicalEncoder,
    store: FeatureStore,
    *,
    max_instances: int | None,
    instance_dropout: float,
    seed: int,
) -> PatientBags:
    rows = cohort.subset(ids)
    encoded = encoder.transform(rows[cohort.feature_names])
    slides = _slides_by_patient(cohort)
    bags = StoreBags(store, [slides.get(p, []) for p in ids])
    return PatientBags(
        bags,
        encoded.values,
        encoded.valid,
        encoded.present,
        rows["label"].to_numpy(np.int64),
        max_instances=max_instances,
        instance_dropout=instance_dropout,
        seed=seed,
    )


def _slides_by_patient(cohort: Cohort) -> dict[str, list[str]]:
    # One groupby over the whole table (not a filter per patient): rows of a patient need not
    # be adjacent, and 1000 filters would cost seconds.
    return {str(p): list(s) for p, s in cohort.slides.groupby("patient_id")["slide_id"]}


def _predict_all(setup: _Setup, fold: int, batch_size: int) -> pd.DataFrame:
    frames = []
    for split, part in setup.parts.items():
        # Whole bags for every split: the training subsets are an augmentation.
        part.dataset.max_instances, part.dataset.instance_dropout = None, 0.0
        # Bounded memory for any bag size (training/bounded.py).
        loader = prediction_loader(
            part.dataset,
            batch_size,
            method=setup.method,
            dim=setup.method.dims.in_dim,
            names=part.ids,
        )
        with streaming_aggregation(setup.method):
            prob_present, prob_absent = predict_loader(setup.method, loader, setup.device)
        frames.append(
            pd.DataFrame(
                {
                    "patient_id": part.ids,
                    "split": split,
                    "fold": fold,
                    "label": part.dataset.labels.numpy(),
                    "clinical_available": part.dataset.clinical_present.numpy(),
                    "prob_present": prob_present,
                    "prob_absent": prob_absent,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _refuse_non_finite(predictions: pd.DataFrame, key: str, target: Path) -> None:
    """A method whose predictions hold NaN is never marked done (``predictions.csv`` is not
    written), so a rerun trains it again instead of evaluating NaN."""
    probabilities = predictions[["prob_present", "prob_absent"]].to_numpy()
    bad = ~np.isfinite(probabilities).all(axis=1)
    if bad.any():
        patients = predictions.loc[bad, "patient_id"].tolist()
        shown = ", ".join(map(str, patients[:5])) + (", …" if len(patients) > 5 else "")
        raise TrainingDivergedError(
            f"{key}: predictions are NaN for {len(patients)} of "
            f"{count(len(bad), 'patient')} ({shown}); "
            f"{target} is not written, so the method is not done: check those patients' "
            "feature files, or lower training.lr"
        )
