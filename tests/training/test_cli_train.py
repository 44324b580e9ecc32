"""`bidistill train` from the command line."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from bidistill.cli import app


@pytest.mark.slow
def test_train_command_writes_the_method_folder(tiny_cohort, tmp_path):
    config = yaml.safe_load(tiny_cohort.read_text())
    config["training"].update({"lr": 3e-3, "max_instances": 32})
    config["cohort"]["table"] = str(tiny_cohort.parent / "cohort.csv")
    config["features"]["dir"] = str(tiny_cohort.parent / "features")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(path),
            "--method",
            "bd",
            "--method",
            "clinical-linear",
            "--out",
            str(out),
            "--epochs",
            "2",
            "--seed",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    splits = json.loads((out / "splits.json").read_text())
    (fold,) = splits["folds"]
    expected = {"train": fold["train"], "val": fold["val"], "test": splits["test"]}
    for name in ("bd", "clinical-linear"):
        log = pd.read_csv(out / name / "train_log.csv")
        assert log["epoch"].tolist() == [1, 2]  # --epochs 2
        meta = json.loads((out / name / "model.json").read_text())
        assert meta["training"]["epochs"] == 2 and meta["training"]["seed"] == 4
        predictions = pd.read_csv(out / name / "predictions.csv", dtype={"patient_id": str})
        # Every patient once, in the split splits.json gives it, both probabilities finite.
        got = predictions.groupby("split")["patient_id"].apply(sorted).to_dict()
        assert got == {split: sorted(ids) for split, ids in expected.items()}
        assert predictions[["prob_present", "prob_absent"]].notna().all().all()


def test_unknown_method_fails_with_the_valid_names(tiny_cohort, tmp_path):
    result = CliRunner().invoke(
        app, ["train", str(tiny_cohort), "--method", "bdd", "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "unknown method 'bdd'" in result.output and "wsi-only" in result.output


def test_unknown_option_in_the_config_fails(tiny_cohort, tmp_path):
    config = yaml.safe_load(tiny_cohort.read_text())
    config["methods"] = [{"name": "bd", "lamda_kd": 0.3}]
    config["cohort"]["table"] = str(tiny_cohort.parent / "cohort.csv")
    config["features"]["dir"] = str(tiny_cohort.parent / "features")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "unknown option 'lamda_kd'" in result.output
