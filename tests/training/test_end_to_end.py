"""End-to-end training on CPU: synthetic patch-folder slides, a tiny random-init timm CNN, BD.

One reference run is trained in-process; the other tests retrain and compare with it: the same
seed gives the same weights (with loader workers or without), a run killed mid-training resumes
to the same weights, two torchrun processes (gloo) give the weights of one. Then the trained run
predicts from slides (Python and CLI) as its own predictions.csv says.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from bidistill.cli import app
from bidistill.config import load_config
from bidistill.experiment import run_experiment, train_methods
from bidistill.slides.stage import tile_from_config
from bidistill.synthetic.patches import make_patch_cohort

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def cohort_config(tmp_path_factory) -> Path:
    """20 patients, 8-16 tiles of 32 px each, tiled; BD for 5 epochs with SGD."""
    path = make_patch_cohort(tmp_path_factory.mktemp("e2e") / "cohort", patients=20, seed=1)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    # BD's published weights, as the paper protocol (configs/bcnb-paper.yaml) trains end to end:
    # with the default lambda_kd 2 the untrained teacher's flat targets hold the WSI branch
    # back on 12 training patients for 5 epochs. Its pooling too (abmil; with the default
    # abmil-count the WSI branch learns on seeds 1-3 of this cohort but not on seed 0).
    raw["methods"] = [{"name": "bd", "lambda_kd": 0.5, "temperature": 1.2, "aggregator": "abmil"}]
    raw["training"].update({"epochs": 5, "lr": 0.05})
    raw["training"]["end_to_end"].update({"optimizer": "sgd", "momentum": 0.9})
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    tile_from_config(load_config(path), progress=False)
    return path


def train(config_path: Path, out: Path, **training) -> Path:
    config = load_config(config_path)
    for key, value in training.items():
        setattr(config.training, key, value)
    train_methods(config, out, methods=["bd"])
    return out / "bd"


@pytest.fixture(scope="module")
def reference(cohort_config, tmp_path_factory) -> Path:
    return train(cohort_config, tmp_path_factory.mktemp("reference"))


def weights(method_dir: Path) -> dict:
    return load_file(str(method_dir / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    assert worst <= atol, f"weights differ by up to {worst:g}"


def test_training_lowers_the_loss_and_learns_the_planted_signal(reference):
    log = pd.read_csv(reference / "train_log.csv")
    assert len(log) == 5
    assert log["loss_total"].iloc[-2:].mean() < log["loss_total"].iloc[0]
    predictions = pd.read_csv(reference / "predictions.csv")
    held_out = predictions[predictions["split"] != "train"]
    for column in ("prob_present", "prob_absent"):  # both BD branches, backbones of their own
        assert roc_auc_score(held_out["label"], held_out[column]) >= 0.8
    assert not (reference / "training_state.pt").exists()  # removed once done
    meta = yaml.safe_load((reference / "model.json").read_text())
    assert meta["end_to_end"]["backbone"]["encoder"] == "timm:test_convnext"
    assert meta["end_to_end"]["bag_size"] == 4
    assert any(k.startswith("aggregator_single.encoder.backbone.") for k in weights(reference))
    # BD's branches are selected each on its own score, as in the feature trainer
    (joint,) = meta["selection"]
    parts = {p["part"]: p for p in joint["parts"]}
    assert {(n, p["select"]) for n, p in parts.items()} == {
        ("multi", "present"),
        ("single", "absent"),
    }
    for name, part in parts.items():
        column = log[f"val_score_{name}"]
        assert part["val_score"] == pytest.approx(column.max())
        assert log["epoch"][column.idxmax()] == part["best_epoch"]  # first best, from 1


def test_the_same_seed_gives_the_same_weights_with_loader_workers(
    cohort_config, reference, tmp_path
):
    again = train(cohort_config, tmp_path, num_workers=2)  # tiles decoded in 2 processes
    assert_same_weights(reference, again)
    a = pd.read_csv(reference / "predictions.csv")
    b = pd.read_csv(again / "predictions.csv")
    pd.testing.assert_frame_equal(a, b)


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(
    cohort_config, reference, tmp_path, caplog
):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "bidistill", "train", str(cohort_config), "--out", str(out)]
    process = subprocess.Popen(
        command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state = out / "bd" / "training_state.pt"
    deadline = time.monotonic() + 240
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()  # SIGKILL, after the first epoch's checkpoint: nothing gets to clean up
    process.wait()
    assert process.returncode == -9 and state.exists()
    assert not (out / "bd" / "predictions.csv").exists()
    # What a kill -9 while the state was saved leaves beside it (a partial copy).
    leftover = out / "bd" / ".training_state.pt.k2j_9x1a.tmp.pt"
    leftover.write_bytes(b"PK\x03\x04 partial")
    with caplog.at_level(logging.INFO, logger="bidistill"):
        train(cohort_config, out)
    assert "resuming from training_state.pt" in caplog.text
    assert_same_weights(reference, out / "bd")
    assert sorted(p.name for p in (out / "bd").glob(".*")) == [] and not state.exists()


def test_two_torchrun_processes_give_the_weights_of_one(cohort_config, reference, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + ["-m", "bidistill", "train", str(cohort_config), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The same steps, summed in another order: equal up to floating point.
    assert_same_weights(reference, tmp_path / "bd", atol=1e-6)
    a = pd.read_csv(reference / "predictions.csv")
    b = pd.read_csv(tmp_path / "bd" / "predictions.csv")
    assert np.allclose(a["prob_present"], b["prob_present"], atol=1e-6)
    # Then `bidistill run` on the folder evaluates and reports, and trains nothing again.
    result = run_experiment(cohort_config, tmp_path, progress=False)
    assert result.trained == [] and (tmp_path / "report.html").is_file()


def test_the_trained_run_predicts_from_slides_as_in_training(cohort_config, reference, tmp_path):
    from bidistill import load_run
    from bidistill.inference.new_slides import Tiles

    cohort_dir = cohort_config.parent
    run = load_run(reference.parent, config=cohort_config, device="cpu")
    assert run.branches == ["multi-modal", "single-modal"]
    table = run.predict(
        Tiles(tmp_path / "tiles", slides=[cohort_dir / "slides"]),
        clinical=cohort_dir / "cohort.csv",
    )
    saved = pd.read_csv(reference / "predictions.csv", dtype={"patient_id": str})
    both = table.merge(saved, on="patient_id")
    assert len(both) == 20
    assert np.allclose(both["probability"], both["prob_present"], atol=1e-6)
    assert set(both["branch"]) <= {"multi-modal", "single-modal"}
    # Without clinical data each slide is a patient predicted by the single-modal branch.
    alone = run.predict(Tiles(tmp_path / "tiles", slides=[cohort_dir / "slides"]))
    assert set(alone["branch"]) == {"single-modal"}
    merged = alone.merge(saved, on="patient_id")
    assert np.allclose(merged["probability"], merged["prob_absent"], atol=1e-6)


def test_predict_and_heatmap_commands_take_slides(cohort_config, reference, tmp_path):
    cohort_dir = cohort_config.parent
    runner = CliRunner()
    common = ["--run", str(reference.parent), "--config", str(cohort_config), "--device", "cpu"]
    slides = ["--slides", str(cohort_dir / "slides")]
    out = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", *common, *slides, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "next: bidistill heatmap" in result.output and "--slides" in result.output
    assert len(pd.read_csv(out)) == 20 and (tmp_path / "tiles" / "P001.h5").is_file()
    maps = tmp_path / "maps"
    result = runner.invoke(
        app, ["heatmap", *common, *slides, "--patient", "P001", "--out", str(maps)]
    )
    assert result.exit_code == 0, result.output
    tiles = pd.read_csv(maps / "P001.tiles.csv")
    assert {"attention_multi-modal", "attention_single-modal"} <= set(tiles.columns)
    assert np.isclose(tiles["attention_multi-modal"].sum(), 1.0)  # weights over the patient
    # Leaving each tile out would run the backbone once per tile: refused before any tiling.
    result = runner.invoke(
        app,
        ["heatmap", *common, *slides, "--score", "leave-one-out", "--out", str(tmp_path / "loo")],
    )
    assert result.exit_code == 1 and "needs a feature run" in result.output, result.output
    assert not any((tmp_path / "loo").iterdir())  # nothing tiled, nothing drawn
    # Feature files are not what an end-to-end run reads: it says what it needs.
    result = runner.invoke(app, ["predict", *common, "--out", str(out)])
    assert result.exit_code == 1 and "give the slides (--slides" in result.output
