"""What `predict` and `heatmap` read: new slides against their cached tiles, clinical values
unseen in training, slides without tiles, files of killed writes, one slide id in two folders,
NaN features, and output paths that cannot be written. Each bad input ends in one `error:` line
that names the file before any prediction is made."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from tests.faults.conftest import (
    assert_one_line_error,
    edit_config,
    invoke,
    make_read_only,
    table,
)

# --- runs and inputs ----------------------------------------------------------------------------


def _features_of(config: Path) -> Path:
    return config.parent / "features"


def _test_slides(config: Path, n: int) -> list[str]:
    rows = table(config)
    return rows.loc[rows["split"] == "test", "slide_id"].head(n).tolist()


def _copy_features(config: Path, slides: list[str], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for slide in slides:
        shutil.copy(_features_of(config) / f"{slide}.h5", folder / f"{slide}.h5")
    return folder


def _predict(run: Path, *args) -> tuple[object, pd.DataFrame | None]:
    out = Path(args[args.index("--out") + 1])
    result = invoke("predict", "--run", run, "--device", "cpu", *args)
    frame = pd.read_csv(out, dtype={"patient_id": str}) if result.exit_code == 0 else None
    return result, frame


# --- 2: a binary value unseen in training -------------------------------------------------------


def _one_patient(config: Path, folder: Path, name: str, er: str) -> Path:
    rows = table(config)
    row = rows[rows["split"] == "test"].head(1).drop(columns=["nodal_status", "split"])
    row = row.drop(columns=["positive_nodes"]).assign(er=er)
    folder.mkdir(parents=True, exist_ok=True)
    row.to_csv(folder / name, index=False)
    return folder / name


def test_a_binary_typo_is_missing_with_a_warning_not_the_other_value(trained_run, tmp_path):
    config, run = trained_run
    probabilities = {}
    for er in ("Postive", "Negative", ""):
        patients = _one_patient(config, tmp_path, f"er_{er or 'blank'}.csv", er)
        out = tmp_path / f"pred_{er or 'blank'}.csv"
        result, frame = _predict(
            run, "--method", "clinical-only", "--clinical", patients, "--out", out
        )
        assert result.exit_code == 0, result.output
        probabilities[er] = frame["probability"].iloc[0]
        if er == "Postive":
            assert "warning: clinical feature 'er': ['Postive'] not seen in training" in (
                result.output
            )
            assert "er" in str(frame["clinical_missing"].iloc[0]).split(";")
    # The typo is read as a blank cell, never as the run's negative value.
    assert probabilities["Postive"] == pytest.approx(probabilities[""], abs=1e-7)
    assert probabilities["Negative"] != pytest.approx(probabilities[""], abs=1e-7)


# --- 3, 13: features without tiles, or with NaN -------------------------------------------------


def test_a_feature_file_without_tiles_is_refused_by_name(trained_run, tmp_path):
    config, run = trained_run
    folder = _copy_features(config, _test_slides(config, 2), tmp_path / "features")
    blank = folder / "BLANK.h5"
    with h5py.File(folder / f"{_test_slides(config, 1)[0]}.h5", "r") as source:
        dim = source["features"].shape[1]
        attrs = dict(source.attrs)
    with h5py.File(blank, "w") as h5:
        h5.create_dataset("features", data=np.zeros((0, dim), dtype=np.float32))
        h5.create_dataset("coords", data=np.zeros((0, 2), dtype=np.int64))
        h5.attrs.update(attrs)
    out = tmp_path / "pred.csv"
    result, _ = _predict(run, "--features", folder, "--out", out)
    assert_one_line_error(result, str(blank), "no tiles", "predict again")
    assert not out.exists()


def test_nan_features_are_refused_by_name_before_any_prediction(trained_run, tmp_path):
    config, run = trained_run
    slides = _test_slides(config, 3)
    folder = _copy_features(config, slides, tmp_path / "features")
    with h5py.File(folder / f"{slides[1]}.h5", "r+") as h5:
        h5["features"][2, 0] = np.nan
    out = tmp_path / "pred.csv"
    result, _ = _predict(run, "--features", folder, "--out", out)
    error = assert_one_line_error(result, str(folder / f"{slides[1]}.h5"), "NaN", "row 2")
    assert "bug" not in error
    assert not out.exists()


# --- 9, 10: files of killed writes, one slide id in two folders ---------------------------------


def test_files_of_killed_writes_are_not_patients(trained_run, tmp_path):
    config, run = trained_run
    slides = _test_slides(config, 2)
    folder = _copy_features(config, slides, tmp_path / "features")
    # What a kill -9 during an atomic write leaves: a whole copy, and a partial one.
    shutil.copy(folder / f"{slides[0]}.h5", folder / f".{slides[0]}.h5.abcd1234.tmp.h5")
    (folder / f".{slides[1]}.h5.x_9y8z7w.tmp.h5").write_bytes(b"\x89HDF\r\n\x1a\n partial")
    result, frame = _predict(run, "--features", folder, "--out", tmp_path / "pred.csv")
    assert result.exit_code == 0, result.output
    assert sorted(frame["slides"]) == sorted(slides)


def test_one_slide_id_in_two_feature_folders_is_refused(trained_run, tmp_path):
    config, run = trained_run
    slides = _test_slides(config, 2)
    first = _copy_features(config, slides, tmp_path / "a")
    second = _copy_features(config, slides[1:], tmp_path / "b")
    out = tmp_path / "pred.csv"
    result, _ = _predict(run, "--features", first, "--features", second, "--out", out)
    assert_one_line_error(
        result,
        f"slide '{slides[1]}'",
        str(first / f"{slides[1]}.h5"),
        str(second / f"{slides[1]}.h5"),
        "--features",
    )
    # The same folder given twice is one set of files, not a conflict.
    result, frame = _predict(run, "--features", first, "--features", first, "--out", out)
    assert result.exit_code == 0, result.output and len(frame) == 2


# --- 15: outputs checked before work ------------------------------------------------------------


def test_predict_out_under_a_file_is_refused_before_any_work(trained_run, tmp_path):
    config, run = trained_run
    folder = _copy_features(config, _test_slides(config, 2), tmp_path / "features")
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder\n")
    result = invoke("predict", "--run", run, "--features", folder, "--out", blocker / "pred.csv")
    assert_one_line_error(result, str(blocker), "is a file", "--out")
    assert "predicted" not in result.output
    result = invoke("heatmap", "--run", run, "--features", folder, "--out", blocker / "maps")
    assert_one_line_error(result, str(blocker), "is a file", "--out")


def test_predict_into_a_read_only_folder_is_refused_before_any_work(trained_run, tmp_path):
    config, run = trained_run
    features = _copy_features(config, _test_slides(config, 2), tmp_path / "features")
    locked = tmp_path / "locked"
    locked.mkdir()
    undo = make_read_only(locked)
    try:
        result = invoke(
            "predict", "--run", run, "--features", features, "--out", locked / "pred.csv"
        )
        assert_one_line_error(result, str(locked), "cannot write there")
        assert "predicted" not in result.output and "Traceback" not in result.output
        result = invoke("heatmap", "--run", run, "--features", features, "--out", locked)
        assert_one_line_error(result, str(locked), "cannot write there")
    finally:
        undo()


# --- 1, 3: new slides against the tiles cached from earlier batches -----------------------------


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory) -> tuple[Path, Path]:
    """A feature run on 12 patch-folder slides, tiled and encoded by a tiny random-init CNN:
    (cohort folder, run dir)."""
    from bidistill.synthetic.patches import make_patch_cohort

    base = tmp_path_factory.mktemp("slide-run")
    config = make_patch_cohort(base / "cohort", patients=12, seed=2, tiles=(4, 6))

    def feature_mode(raw):
        raw["methods"] = ["wsi-only"]
        raw["features"].update(dir="features", batch_size=16, num_workers=0)
        raw["training"] = {"epochs": 1, "patience": 1, "batch_size": 4, "device": "cpu"}
        raw["evaluation"] = {"mask_seeds": 1, "bootstrap": 0, "missing_rates": [0.0, 1.0]}

    edit_config(config, feature_mode)
    result = invoke("run", config, "--out", base / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    return config.parent, base / "run"


def _batch(cohort: Path, folder: Path, slides: dict[str, str]) -> Path:
    """A folder of new slides: slide id → the cohort slide whose patches it holds."""
    for slide_id, source in slides.items():
        shutil.rmtree(folder / slide_id, ignore_errors=True)
        shutil.copytree(cohort / "slides" / source, folder / slide_id)
    return folder


def test_a_new_batch_with_the_same_slide_ids_is_tiled_and_encoded_again(slide_run, tmp_path):
    cohort, run = slide_run
    out = tmp_path / "out"
    first = _batch(cohort, tmp_path / "new", {"X1": "P001", "X2": "P002", "X3": "P003"})
    result, batch_a = _predict(run, "--slides", first, "--out", out / "a.csv")
    assert result.exit_code == 0, result.output
    # Batch B: the same ids, other images, in the same folder; predicted into the same --out.
    _batch(cohort, first, {"X1": "P010", "X2": "P011", "X3": "P012"})
    result, batch_b = _predict(run, "--slides", first, "--out", out / "b.csv")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    # What a fresh tiles folder gives for batch B.
    fresh = tmp_path / "fresh"
    result, expected = _predict(run, "--slides", first, "--tiles", fresh, "--out", fresh / "b.csv")
    assert result.exit_code == 0, result.output
    assert not np.allclose(batch_a["probability"], expected["probability"], atol=1e-6)
    np.testing.assert_allclose(batch_b["probability"], expected["probability"], atol=1e-6)
    assert "tiled from another file" in said


def test_only_the_slides_given_are_predicted(slide_run, tmp_path):
    cohort, run = slide_run
    out = tmp_path / "out"
    first = _batch(cohort, tmp_path / "a", {"X1": "P001", "X2": "P002", "X3": "P003"})
    result, _ = _predict(run, "--slides", first, "--out", out / "a.csv")
    assert result.exit_code == 0, result.output
    second = _batch(cohort, tmp_path / "b", {"Y1": "P004", "Y2": "P005"})
    result, frame = _predict(run, "--slides", second, "--out", out / "b.csv")
    assert result.exit_code == 0, result.output
    assert sorted(frame["patient_id"]) == ["Y1", "Y2"]


def test_a_blank_slide_is_refused_by_name_not_given_a_decision(slide_run, tmp_path):
    from PIL import Image

    cohort, run = slide_run
    folder = _batch(cohort, tmp_path / "new", {"X1": "P001"})
    blank = folder / "BLANK.png"
    Image.new("RGB", (256, 256), (255, 255, 255)).save(blank)
    out = tmp_path / "pred.csv"
    result, _ = _predict(run, "--slides", folder, "--out", out)
    assert_one_line_error(result, str(blank), "no tile", "predict again")
    assert not out.exists()
