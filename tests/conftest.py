"""Shared fixtures: real files in tmp_path, made by the project's own generators."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(items):
    """Files with slow tests run first: with `make test`'s `--dist loadfile
    --no-loadscope-reorder` the longest files start at once, instead of one of them starting
    last and ending the suite alone (xdist's own order puts the files with most tests first)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: files stay whole


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory) -> Path:
    """A small synthetic feature cohort (config path); shared read-only by the tests."""
    from bidistill.synthetic.features import make_feature_cohort

    out = tmp_path_factory.mktemp("synth")
    return make_feature_cohort(out, patients=80, seed=3, dim=16, instances=(20, 40))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One torch thread in every test process: the models are tiny, and `make test` runs two
    workers on two cores, where a worker's second OpenMP thread only waits for the other
    worker's (an epoch of a tiny model up to 30 times slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
