"""A three-class label in end-to-end mode: patch folders, a tiny timm CNN trained inside BD and
wsi-only, bag probabilities reduced per class, and prediction from the slides themselves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from bidistill.cli import app
from bidistill.synthetic.patches import make_patch_cohort

pytestmark = pytest.mark.slow
CLASSES = ("a", "b", "c")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e3")
    config = make_patch_cohort(folder / "cohort", patients=24, seed=1)
    table = pd.read_csv(folder / "cohort" / "cohort.csv", dtype=str)
    # every split holds every class
    table["label"] = table.groupby("split").cumcount().map(lambda i: CLASSES[i % 3])
    table.to_csv(folder / "cohort" / "cohort.csv", index=False)
    raw = yaml.safe_load(config.read_text())
    raw["cohort"]["label"] = {"column": "label", "classes": {c: [c] for c in CLASSES}}
    raw["training"]["epochs"] = 2
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(folder / "run")])
    assert result.exit_code == 0, result.output
    return folder


def test_every_method_writes_each_class_probability(run):
    for method in ("bd", "wsi-only"):
        frame = pd.read_csv(run / "run" / method / "predictions.csv")
        for split in ("present", "absent"):
            probs = frame[[f"prob_{split}_{k}" for k in range(3)]].to_numpy()
            np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    metrics = pd.read_csv(run / "run" / "metrics.csv")
    assert set(metrics["method"]) == {"bd", "wsi-only"} and metrics["auc"].between(0, 1).all()


def test_prediction_from_the_slides_is_the_runs_own(run):
    cohort = run / "cohort"
    out = run / "new.csv"
    args = ["predict", "--run", str(run / "run"), "--method", "wsi-only"]
    args += ["--slides", str(cohort / "slides"), "--tiles", str(run / "tiles")]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out).set_index("patient_id")
    own = pd.read_csv(run / "run" / "wsi-only" / "predictions.csv").set_index("patient_id")
    columns = [f"probability_{c}" for c in CLASSES]
    np.testing.assert_allclose(
        table.loc[own.index, columns].to_numpy(),
        own[[f"prob_absent_{k}" for k in range(3)]].to_numpy(),
        atol=1e-4,
    )
