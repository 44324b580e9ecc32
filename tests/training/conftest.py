"""A small synthetic cohort and every method trained on it once (shared by the tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bidistill.cohort import load_cohort, resolve_splits
from bidistill.config import load_config
from bidistill.models import list_methods
from bidistill.synthetic.features import make_feature_cohort


def fast_config(config_path: Path, **training):
    """The cohort's config with a short, fast training schedule for tests."""
    config = load_config(config_path)
    settings = {
        "epochs": 12,
        "lr": 3e-3,
        "patience": 12,
        "lr_warmup_epochs": 1,
        "batch_size": 16,
        "max_instances": 32,
        "device": "cpu",
    }
    for key, value in {**settings, **training}.items():
        setattr(config.training, key, value)
    return config


def train_method(config, method_cfg, run: Path, **kwargs) -> Path:
    """The trainer writing into ``run/<method>/``, as a holdout run keeps it; the folder."""
    from bidistill.runs.rundir import MethodDir
    from bidistill.training import train_method as train

    method_dir = MethodDir(Path(run) / method_cfg.key, kwargs.get("fold", 0))
    train(config, method_cfg, method_dir, **kwargs)
    return method_dir.path


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """120 patients, 16-d features, 20-60 instances per slide: trains a method in a second."""
    out = tmp_path_factory.mktemp("tiny-cohort")
    return make_feature_cohort(out, patients=120, seed=3, dim=16, instances=(20, 60))


@pytest.fixture(scope="session")
def trained_run(tiny_cohort, tmp_path_factory) -> Path:
    """Every registered method trained on the tiny cohort into one run folder."""
    from bidistill.training import open_feature_store

    config = fast_config(tiny_cohort)
    run = tmp_path_factory.mktemp("run")
    cohort = load_cohort(config.cohort)
    splits = resolve_splits(cohort, config.cohort.splits, run / "splits.json")
    store = open_feature_store(config, cohort)
    for name in list_methods():
        method_cfg = next((m for m in config.methods if m.name == name), None)
        if method_cfg is None:
            from bidistill.config import MethodConfig

            method_cfg = MethodConfig(name=name)
        train_method(
            config, method_cfg, run, cohort=cohort, splits=splits, store=store, progress=False
        )
    return run
