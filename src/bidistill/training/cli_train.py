"""What ``bidistill train`` does, kept out of cli.py so that the CLI stays thin."""

from __future__ import annotations

import logging
from pathlib import Path

from bidistill.cohort import load_cohort, resolve_splits
from bidistill.config import ExperimentConfig, MethodConfig
from bidistill.errors import ConfigError
from bidistill.models import get_method_class
from bidistill.training.train import open_feature_store, train_method

log = logging.getLogger(__name__)


def train_from_config(
    config: ExperimentConfig,
    out: Path,
    *,
    methods: list[str] | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    fold: int = 0,
) -> list[Path]:
    """Train the named methods (default: the config's) and return their folders.

    A method named on the command line but not in the config trains with its default options.
    Splits come from ``out/splits.json`` when it exists, so every method sees the same patients.

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
    cohort = load_cohort(config.cohort)
    splits = resolve_splits(cohort, config.cohort.splits, Path(out) / "splits.json")
    if fold >= len(splits.folds):
        raise ConfigError(f"--fold {fold}: the splits have {len(splits.folds)} fold(s)")
    store = open_feature_store(config, cohort, progress=True)
    return [
        train_method(config, method_cfg, out, cohort=cohort, splits=splits, fold=fold, store=store)
        for method_cfg in chosen
    ]
