"""One prediction path over both bag sources: a feature run given new slides (tiled and encoded
with the run's settings) and an end-to-end run (tiles through its fine-tuned encoder) predict
what their own training predicted, decide at the validation thresholds of each route, map
attention onto each slide's tiles and refuse inputs of another kind."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import bidistill
from bidistill.cli import app
from bidistill.inference import FeatureIdentityError, Tiles
from bidistill.inference.new_slides import TilesError
from bidistill.slides import read_coords
from bidistill.thresholds import youden_threshold

pytestmark = pytest.mark.slow

MODES = ["features", "end-to-end"]


@pytest.fixture(scope="module", params=MODES)
def slide_run(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(mode, cohort folder, run dir): BD trained for 2 epochs on 12 patch-folder slides, on
    the features of a tiny random-init CNN or end to end through it."""
    from bidistill.experiment import run_experiment
    from bidistill.synthetic.patches import make_patch_cohort

    base = tmp_path_factory.mktemp(request.param)
    config = make_patch_cohort(base / "cohort", patients=12, seed=2, tiles=(4, 6))
    raw = yaml.safe_load(config.read_text())
    raw["methods"] = ["bd"]
    raw["training"].update(epochs=2, patience=2, device="cpu")
    raw["evaluation"] = {"mask_seeds": 1, "bootstrap": 0, "missing_rates": [0.0, 1.0]}
    if request.param == "features":
        raw["training"]["mode"] = "features"
        raw["features"].update(dir="features", batch_size=16, num_workers=0)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_experiment(config, base / "run", progress=False)
    return request.param, config.parent, base / "run"


def _saved(run: Path, split: str | None = None) -> pd.DataFrame:
    saved = pd.read_csv(run / "bd" / "predictions.csv", dtype={"patient_id": str})
    return (saved if split is None else saved[saved["split"] == split]).set_index("patient_id")


def test_the_source_is_chosen_by_how_the_run_was_trained(slide_run):
    mode, _, run_dir = slide_run
    run = bidistill.load_run(run_dir, device="cpu")
    assert run.end_to_end == (mode == "end-to-end")
    assert run.branches == ["multi-modal", "single-modal"]


def test_new_slides_predict_what_training_predicted_at_each_routes_threshold(slide_run, tmp_path):
    _, cohort, run_dir = slide_run
    run = bidistill.load_run(run_dir, device="cpu")
    slides = Tiles(tmp_path / "tiles", slides=[cohort / "slides"])
    saved, val = _saved(run_dir), _saved(run_dir, "val")
    with_clinical = run.predict(slides, clinical=cohort / "cohort.csv").set_index("patient_id")
    assert sorted(with_clinical.index) == sorted(saved.index)
    np.testing.assert_allclose(
        with_clinical["probability"], saved.loc[with_clinical.index, "prob_present"], atol=1e-5
    )
    # Every patient here has some clinical value: the multi-modal branch, at its threshold.
    assert with_clinical["clinical_present"].all()
    assert set(with_clinical["branch"]) == {"multi-modal"}
    present = youden_threshold(val["label"].to_numpy(), val["prob_present"].to_numpy())
    np.testing.assert_allclose(with_clinical["threshold"], present)
    # Without a table each slide is a patient without clinical data: the single-modal branch.
    alone = run.predict(slides).set_index("patient_id")
    np.testing.assert_allclose(
        alone["probability"], saved.loc[alone.index, "prob_absent"], atol=1e-5
    )
    assert set(alone["branch"]) == {"single-modal"}
    absent = youden_threshold(val["label"].to_numpy(), val["prob_absent"].to_numpy())
    np.testing.assert_allclose(alone["threshold"], absent)
    assert (alone["decision"] == (alone["probability"] >= alone["threshold"])).all()


def test_attention_is_mapped_onto_each_slides_tiles(slide_run, tmp_path):
    _, cohort, run_dir = slide_run
    run = bidistill.load_run(run_dir, device="cpu")
    slides = Tiles(tmp_path / "tiles", slides=[cohort / "slides"])
    (patient,) = run.attention(slides, cohort / "cohort.csv", patients=["P001"])
    (slide,) = patient.slides
    coords = read_coords(tmp_path / "tiles" / "P001.h5").coords
    np.testing.assert_array_equal(slide.coords, coords)
    assert patient.n_tiles == len(coords) and slide.routed == "multi-modal"
    for branch in run.branches:  # the weights of the patient's tiles sum to 1, per branch
        assert slide.scores[branch].shape == (len(coords),)
        assert slide.scores[branch].sum() == pytest.approx(1, abs=1e-5)
    # The attention path predicts what predict does.
    table = run.predict(slides, cohort / "cohort.csv", patients=["P001"])
    assert patient.probability == pytest.approx(table["probability"].iloc[0], abs=1e-7)


def test_predict_from_slides_then_the_heatmap_it_points_at(slide_run, tmp_path):
    _, cohort, run_dir = slide_run
    out = tmp_path / "pred.csv"
    args = ["--run", run_dir, "--slides", cohort / "slides", "--clinical", cohort / "cohort.csv"]
    args += ["--patient", "P001", "--device", "cpu", "--out", out]
    result = CliRunner().invoke(app, ["predict", *map(str, args)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiles" / "P001.h5").is_file()  # tiled into --tiles' default
    (next_line,) = [line for line in result.output.splitlines() if line.startswith("next: ")]
    command = shlex.split(next_line.removeprefix("next: "))
    assert command[:2] == ["bidistill", "heatmap"] and "--slides" in command, command
    maps = CliRunner().invoke(app, command[1:])
    assert maps.exit_code == 0, maps.output
    predicted = pd.read_csv(out, dtype={"patient_id": str})
    drawn = pd.read_csv(tmp_path / "heatmaps" / "predictions.csv", dtype={"patient_id": str})
    pd.testing.assert_frame_equal(drawn, predicted)  # the heatmap predicted what predict did
    assert predicted["branch"].tolist() == ["multi-modal"]
    tiles = pd.read_csv(tmp_path / "heatmaps" / "P001.tiles.csv")
    assert len(tiles) == len(read_coords(tmp_path / "tiles" / "P001.h5").coords)
    for branch in ("multi-modal", "single-modal"):
        assert tiles[f"attention_{branch}"].sum() == pytest.approx(1, abs=1e-5)
    np.testing.assert_array_equal(tiles["attention"], tiles["attention_multi-modal"])


def test_tiles_of_another_patch_size_are_refused_before_any_prediction(slide_run, tmp_path):
    """Slides tiled earlier into the --tiles folder with another patch size than the run's."""
    from bidistill.config import load_config
    from bidistill.slides.stage import tile_from_config

    mode, cohort, run_dir = slide_run
    config = load_config(run_dir / "config.yaml")
    config.tiling.patch_size, config.tiling.coords_dir = 64, tmp_path / "tiles"
    tile_from_config(config, progress=False)
    run = bidistill.load_run(run_dir, device="cpu")
    slides = Tiles(tmp_path / "tiles", slides=[cohort / "slides"])
    if mode == "end-to-end":
        refusal = r"P001.h5: tiles of another kind.*patch_size 64 \(the run's: 32\)"
        with pytest.raises(TilesError, match=refusal):
            run.predict(slides, patients=["P001"])
        # Feature files are not what an end-to-end run reads: it says what it needs.
        with pytest.raises(TilesError, match="trained end to end on tiles"):
            run.predict(cohort / "features")
        args = ["--run", run_dir, "--features", tmp_path, "--out", tmp_path / "p.csv"]
        result = CliRunner().invoke(app, ["predict", *map(str, args)])
        assert result.exit_code == 1 and "give the slides (--slides" in result.output
    else:  # encoded at the run's settings but from these tiles: features of another kind
        refusal = r"P001.h5: features of another kind.*patch_size 64 \(the run's: 32\)"
        with pytest.raises(FeatureIdentityError, match=refusal):
            run.predict(slides, patients=["P001"])
