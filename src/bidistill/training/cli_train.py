"""What ``bidistill train`` does, kept out of cli.py so that the CLI stays thin."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from bidistill.cohort import Splits, load_cohort, resolve_splits
from bidistill.config import ExperimentConfig, MethodConfig
from bidistill.errors import ConfigError
from bidistill.models import get_method_class
from bidistill.runs.lock import lock_run_dir
from bidistill.runs.preflight import check_device, check_trainable_cohort, prepare_output_dir
from bidistill.runs.rundir import MethodDir
from bidistill.training.distributed import barrier, launched_by_torchrun, process_group
from bidistill.training.feature_source import open_feature_store
from bidistill.training.train import train_method

log = logging.getLogger(__name__)


def train_from_config(
    config: ExperimentConfig,
    out: Path,
    *,
    methods: list[str] | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    fold: int = 0,
    say: Callable[[str], None] = log.info,
    store=None,
) -> list[Path]:
    """Train the named methods (default: the config's) and return their folders.

    A method named on the command line but not in the config trains with its default options.
    Splits come from ``out/splits.json`` when it exists, so every method sees the same patients.
    The device, the output folder and the label table are checked first; ``out`` is locked
    while it trains (one bidistill process per run folder).

    ``store``: the cohort's feature store when the checks before work opened it already.

    Side effects: writes ``out/splits.json`` and ``out/<method>/``.
    """
    if epochs is not None:
        config.training.epochs = epochs
    if seed is not None:
        config.training.seed = seed
    configured = {m.key: m for m in config.methods}
    chosen = [configured.get(name, MethodConfig(name=name)) for name in methods or configured]
    for method_cfg in chosen:
        get_method_class(method_cfg.name)  # unknown names fail before any work
    check_device(config.training.device, "training.device")
    out = Path(out)
    if launched_by_torchrun() and config.training.mode != "end-to-end":
        raise ConfigError(
            "torchrun runs end-to-end training (training.mode: end-to-end) over several "
            "processes; feature-mode training runs in one process: `bidistill train` alone"
        )
    with process_group(config.training.device) as processes:  # torchrun: one per GPU
        prepare_output_dir(out)
        lock = lock_run_dir(out, command=f"train --out {out}", say=say)
        with lock if processes.is_main else contextlib.nullcontext():
            cohort = load_cohort(config.cohort)
            if cohort.label_summary is not None and processes.is_main:
                say(cohort.label_summary.format())
            splits = _shared_splits(config, cohort, out / "splits.json", processes)
            if fold >= len(splits.folds):
                raise ConfigError(f"--fold {fold}: the splits have {len(splits.folds)} fold(s)")
            check_trainable_cohort(cohort, splits)
            if store is None and config.training.mode == "features":
                store = open_feature_store(config, cohort, progress=True)
            written = []
            for method_cfg in chosen:
                method_dir = MethodDir(out / method_cfg.key, fold)
                written.append(method_dir.path)
                if method_dir.done:
                    say(f"{method_cfg.key}: done already ({method_dir.predictions.name} exists)")
                    continue
                train_method(
                    config,
                    method_cfg,
                    method_dir,
                    cohort=cohort,
                    splits=splits,
                    fold=fold,
                    store=store,
                )
                if processes.is_main:
                    _record(out, config, method_cfg, cohort, splits)
            return written


def _record(out: Path, config: ExperimentConfig, method_cfg, cohort, splits) -> None:
    """Record what a holdout method was trained on, as `bidistill run` does, so that a later
    `bidistill run` on the same folder and config keeps it (end-to-end training under torchrun,
    then `bidistill run` to evaluate, retrains nothing)."""
    if len(splits.folds) != 1:
        return  # k-fold: `run` keeps folds/fold<i>/<method>/, `train --fold` writes <method>/
    from bidistill.runs.fingerprint import record_stage
    from bidistill.runs.inputs import FeatureIdentities, method_inputs

    fold = splits.folds[0]
    split_ids = {"train": fold.train, "val": fold.val, "test": splits.test}
    features = FeatureIdentities(config.features.dir)
    record_stage(
        out, method_cfg.key, method_inputs(config, method_cfg, cohort, split_ids, features)
    )


def _shared_splits(config: ExperimentConfig, cohort, path: Path, processes):
    """The splits, made (or read) by process 0 and read by the others once it has written them."""
    if processes.is_main:
        splits = resolve_splits(cohort, config.cohort.splits, path)
    barrier(processes)
    return splits if processes.is_main else Splits.load(path)
