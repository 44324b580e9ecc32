"""Shared fixtures: real files in tmp_path, made by the project's own generators."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory) -> Path:
    """A small synthetic feature cohort (config path); shared read-only by the tests."""
    from bidistill.synthetic.features import make_feature_cohort

    out = tmp_path_factory.mktemp("synth")
    return make_feature_cohort(out, patients=80, seed=3, dim=16, instances=(20, 40))
