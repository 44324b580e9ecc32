"""Fixtures: a small trained run in the layout of `make demo` (demo_run/cohort, demo_run/run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A folder holding ``demo_run/cohort`` (a synthetic cohort: 120 patients, 32-d features,
    30-120 tiles per slide, planted key instances) and ``demo_run/run`` (bd, wsi-only and
    clinical-only trained on it by ``bidistill run``), as `make demo` lays them out."""
    from bidistill.experiment import run_experiment
    from bidistill.synthetic.features import make_feature_cohort

    root = tmp_path_factory.mktemp("inference")
    config = make_feature_cohort(
        root / "demo_run" / "cohort", patients=120, seed=3, dim=32, instances=(30, 120)
    )
    raw = yaml.safe_load(config.read_text())
    raw["methods"] = ["bd", "wsi-only", "clinical-only"]
    raw["training"].update(epochs=12, patience=12, lr=1e-3, device="cpu")
    raw["evaluation"].update(mask_seeds=2, bootstrap=0)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_experiment(config, root / "demo_run" / "run", progress=False)
    return root


@pytest.fixture(scope="session")
def demo_run(demo_root) -> Path:
    return demo_root / "demo_run" / "run"


@pytest.fixture(scope="session")
def demo_cohort(demo_root) -> Path:
    return demo_root / "demo_run" / "cohort"
