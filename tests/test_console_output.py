"""What the console shows a new user: whole encoder names at 80 columns, each warning once, no
blank first lines, counts in the right number, and a training progress line with the method,
the epoch counter and the best score so far."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from bidistill.cli import app
from bidistill.features.encoders import list_encoders
from bidistill.synthetic.features import make_feature_cohort
from bidistill.training.progress import describe_best


def test_encoders_at_80_columns_shows_every_name_and_dimension_whole():
    result = CliRunner().invoke(app, ["encoders"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    rows = [line.split("│") for line in result.stdout.splitlines() if line.startswith("│")]
    names = {cells[1].strip() for cells in rows if cells[1].strip()}
    dims = {cells[2].strip() for cells in rows if cells[2].strip()}
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    for spec in list_encoders():
        assert spec.name in names and str(spec.dim) in dims, spec.name


def test_the_best_score_reads_a_dash_before_the_first():
    assert describe_best({"bd": float("-inf")}) == "best –"
    assert describe_best({"multi": 0.8614, "single": float("-inf")}) == "best multi 0.861 single –"


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> Path:
    """60 patients, random-init features, one blank label and one unlisted value (dropped)."""
    folder = tmp_path_factory.mktemp("console")
    config = make_feature_cohort(folder, patients=60, dim=8, instances=(5, 10))
    table = pd.read_csv(folder / "cohort.csv")
    label = yaml.safe_load(config.read_text())["cohort"]["label"]
    train = table.index[table["split"] == "train"]
    table.loc[train[0], label["column"]] = None
    table.loc[train[1], label["column"]] = "unknown"
    table.to_csv(folder / "cohort.csv", index=False)
    raw = yaml.safe_load(config.read_text())
    raw["cohort"]["label"]["unlisted"] = "drop"
    raw["features"]["random_init"] = True
    raw["methods"] = ["bd", "wsi-only"]
    raw["training"].update({"epochs": 2, "lr_warmup_epochs": 0})
    raw["evaluation"] = {"mask_seeds": 2, "bootstrap": 20}
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


@pytest.mark.slow
def test_a_run_prints_each_warning_once_and_counts_in_the_right_number(small_cohort, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["run", str(small_cohort), "--out", str(out)], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("RANDOMLY INITIALISED") == 1
    assert result.stderr.splitlines()[0].strip()  # no blank first line
    assert "1 patient with a blank label is left out" in result.stderr
    assert "left out 1 patient whose label is in neither list" in result.stderr
    # The progress line: method, epoch x/N, loss and the best score so far, within 80 columns.
    bars = [line for line in result.stderr.splitlines() if " epoch " in line and "loss" in line]
    assert any(re.match(r"bd epoch 2/2 .*loss \S+  best multi \S+ single \S+$", b) for b in bars)
    assert any(re.match(r"wsi-only epoch 2/2 .*loss \S+  best \d\.\d{3}$", b) for b in bars)
    assert all(len(b) <= 80 for b in bars), bars
    predict = CliRunner().invoke(
        app,
        ["predict", "--run", str(out), "--features", str(small_cohort.parent / "features")]
        + ["--patient", "S0001", "--out", str(tmp_path / "one.csv")],
    )
    assert predict.exit_code == 0, predict.output
    assert predict.output.startswith("predicted 1 patient with bd:"), predict.output
