"""What `predict` and `heatmap` write and print: the class a probability is of, the branch a
tile's scores belong to, the random-weights warning, and `next:` lines that work as printed."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from bidistill.cli import app

from .helpers import new_patients_table

runner = CliRunner()
pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[2] / "README.md"
TWO_POSITIVES = "N+(1-2) or N+(>2)"


def bidistill(*args):
    return runner.invoke(app, [str(a) for a in args])


def next_command(output: str) -> list[str]:
    """The `next:` line (the last line a command prints) as argv."""
    lines = [line for line in output.splitlines() if line.startswith("next: ")]
    assert len(lines) == 1 and output.rstrip().endswith(lines[0]), output
    return shlex.split(lines[0].removeprefix("next: "))


def opened_file(output: str) -> Path:
    """The file a `next: open FILE` line names; it must exist."""
    command = next_command(output)
    assert command[0] == "open" and len(command) == 2, command
    assert Path(command[1]).is_file(), command
    return Path(command[1])


def small_run(folder: Path, edit) -> Path:
    """A synthetic cohort of 40 patients, its config changed by ``edit(raw, table)``, trained
    (wsi-only and bd, one epoch) by `bidistill run` into ``folder/run``."""
    from bidistill.synthetic.features import make_feature_cohort

    config = make_feature_cohort(
        folder / "cohort", patients=40, seed=1, dim=8, instances=(4, 10), two_slide_share=0.0
    )
    raw = yaml.safe_load(config.read_text())
    table = pd.read_csv(config.parent / "cohort.csv", dtype=str, keep_default_na=False)
    raw["methods"] = ["bd", "wsi-only"]
    raw["training"].update(epochs=1, patience=1, batch_size=8, device="cpu")
    raw["evaluation"] = {"mask_seeds": 2, "bootstrap": 0, "missing_rates": [0.0, 1.0]}
    edit(raw, table)
    table.to_csv(config.parent / "cohort.csv", index=False)
    config.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    result = bidistill("run", config, "--out", folder / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    return folder / "run"


# --- the positive class ---------------------------------------------------------------------


def _two_positive_values(raw, table):
    """N+ split by the number of positive nodes, both positive, as a nodal-stage table has it."""
    nodes = pd.to_numeric(table["positive_nodes"])
    positive = table["nodal_status"] == "N+"
    table.loc[positive & (nodes <= 2), "nodal_status"] = "N+(1-2)"
    table.loc[positive & (nodes > 2), "nodal_status"] = "N+(>2)"
    assert set(table["nodal_status"]) == {"N0", "N+(1-2)", "N+(>2)"}
    raw["cohort"]["label"]["positive"] = ["N+(1-2)", "N+(>2)"]


@pytest.fixture(scope="module")
def two_positive_run(tmp_path_factory) -> Path:
    return small_run(tmp_path_factory.mktemp("two_positives"), _two_positive_values)


def test_the_positive_class_is_every_positive_value_or_the_configs_name(two_positive_run, tmp_path):
    run = two_positive_run
    cohort = run.parent / "cohort"
    clinical = new_patients_table(cohort, tmp_path / "new.csv")
    out = tmp_path / "pred.csv"
    args = ["--run", run, "--features", cohort / "features", "--clinical", clinical]
    result = bidistill("predict", *args, "--out", out)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    # `probability` is the probability of the class in `positive_class`, all positive values.
    assert set(table["positive_class"]) == {TWO_POSITIVES}
    named = np.where(table["decision"] == 1, TWO_POSITIVES, "N0")
    assert list(table["predicted"]) == list(named)
    assert f"{int(table['decision'].sum())} {TWO_POSITIVES} at the run's" in result.output

    # Names the config gives (display only: the same run, the config passed with --config).
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["cohort"]["label"].update(positive_name="node-positive", negative_name="node-negative")
    named_config = tmp_path / "named.yaml"
    named_config.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    renamed = tmp_path / "renamed.csv"
    result = bidistill("predict", *args, "--config", named_config, "--out", renamed)
    assert result.exit_code == 0, result.output
    again = pd.read_csv(renamed)
    assert set(again["positive_class"]) == {"node-positive"}
    assert list(again["predicted"]) == [
        "node-positive" if d else "node-negative" for d in again["decision"]
    ]
    np.testing.assert_array_equal(again["probability"], table["probability"])
    assert "`positive_class`" in README.read_text(encoding="utf-8")


# --- random weights -------------------------------------------------------------------------


def _random_encoder(raw, table):
    raw["features"]["random_init"] = True


def test_predict_and_heatmap_on_a_random_init_run_say_so(tmp_path_factory, tmp_path):
    run = small_run(tmp_path_factory.mktemp("random_init"), _random_encoder)
    features = run.parent / "cohort" / "features"
    result = bidistill("predict", "--run", run, "--features", features, "--out", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "RANDOM weights" in line]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: "), result.output
    one_slide = ["--features", features / "S0000.h5", "--out", tmp_path / "maps"]
    result = bidistill("heatmap", "--run", run, *one_slide)
    assert result.exit_code == 0, result.output
    assert "WARNING: this run's patch encoder had RANDOM weights" in result.output


# --- predict's next line, the heatmap it names, tiles.csv -----------------------------------


def test_the_heatmap_predict_points_at_predicts_what_predict_did(demo_run, demo_cohort, tmp_path):
    clinical = new_patients_table(demo_cohort, tmp_path / "new.csv")
    with_clinical = pd.read_csv(clinical, dtype=str)["patient_id"].iloc[:2].tolist()
    out = tmp_path / "pred.csv"
    patients = [a for p in with_clinical for a in ("--patient", p)]
    args = ["--features", demo_cohort / "features", "--clinical", clinical, *patients]
    result = bidistill("predict", "--run", demo_run, *args, "--method", "bd", "--out", out)
    assert result.exit_code == 0, result.output
    assert "RANDOM" not in result.output
    command = next_command(result.output)
    assert command[:2] == ["bidistill", "heatmap"]
    assert "--clinical" in command and "--patient" in command, command

    maps = bidistill(*command[1:])
    assert maps.exit_code == 0, maps.output
    predicted = pd.read_csv(out, dtype={"patient_id": str}).set_index("patient_id")
    drawn = pd.read_csv(tmp_path / "heatmaps" / "predictions.csv", dtype={"patient_id": str})
    drawn = drawn.set_index("patient_id").loc[predicted.index]
    assert "multi-modal" in set(predicted["branch"])  # the patients' clinical data was used
    pd.testing.assert_frame_equal(drawn, predicted)
    assert opened_file(maps.output).name.endswith(".heatmap.png")

    # tiles.csv: the unsuffixed columns are the predicting branch's, percentile a fraction.
    for _, row in predicted.iterrows():
        for slide_id in row["slides"].split(";"):
            tiles = pd.read_csv(tmp_path / "heatmaps" / f"{slide_id}.tiles.csv")
            assert set(tiles["branch"]) == {row["branch"]}
            branch = row["branch"]
            np.testing.assert_array_equal(tiles["attention"], tiles[f"attention_{branch}"])
            np.testing.assert_array_equal(tiles["percentile"], tiles[f"percentile_{branch}"])
            assert tiles["percentile"].between(0, 1).all() and tiles["percentile"].max() == 1
            # The percentile ranks the predicting branch's attention within the slide.
            ranked = tiles.sort_values("attention")["percentile"].to_numpy()
            assert ranked[0] == 0 and (np.diff(ranked) >= 0).all()
    readme_row = next(
        line for line in README.read_text(encoding="utf-8").splitlines() if "tiles.csv` |" in line
    )
    assert "`branch`" in readme_row and "fraction" in readme_row


def test_predict_from_a_clinical_only_method_points_at_its_table(demo_run, demo_cohort, tmp_path):
    clinical = new_patients_table(demo_cohort, tmp_path / "new.csv")
    out = tmp_path / "pred.csv"
    args = ["--features", demo_cohort / "features", "--clinical", clinical]
    result = bidistill("predict", "--run", demo_run, *args, "-m", "clinical-only", "--out", out)
    assert result.exit_code == 0, result.output
    assert opened_file(result.output) == out  # no heatmap: the method reads no slides


# --- heatmap's hints ------------------------------------------------------------------------


def test_a_patch_folder_heatmap_points_only_at_files_it_wrote(demo_run, tmp_path):
    import h5py

    rng = np.random.default_rng(0)
    folder = tmp_path / "slides" / "PF1"
    folder.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{i:02d}.png"
        )
    features = tmp_path / "PF1.h5"
    with h5py.File(features, "w") as h5:
        h5["features"] = rng.normal(size=(6, 32)).astype(np.float32)
        h5["coords"] = np.stack([np.arange(6), np.zeros(6, int)], axis=1)
        h5.attrs.update({"encoder": "synthetic", "patch_size": 256, "mpp": 0.5})
    out = tmp_path / "out"
    result = bidistill("heatmap", "--run", demo_run, "--features", features, "--slides", folder,
                       "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not list(out.glob("*.geojson")) and "geojson" not in result.output
    assert opened_file(result.output) == out / "PF1.montage.png"


def test_a_slide_not_among_the_given_slides_is_said_so(demo_run, demo_cohort, tmp_path):
    elsewhere = tmp_path / "other_slides"
    elsewhere.mkdir()
    Image.new("RGB", (64, 64), "white").save(elsewhere / "S9999.png")
    out = tmp_path / "out"
    result = bidistill("heatmap", "--run", demo_run, "--features",
                       demo_cohort / "features" / "S0000.h5", "--slides", elsewhere,
                       "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "1 slide not found among --slides" in text and "S0000" in text
    assert "give --slides" not in text
    assert opened_file(result.output) == out / "S0000.heatmap.png"
