"""The checks before work: `config` runs every stage's checks, and `run`, `tile` and `extract`
run the same ones before they write anything, so `config` says ok to exactly what they accept."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import pytest
import yaml

from bidistill.features import feature_path

from .conftest import assert_one_line_error, edit_config, invoke, slide_of_split, small_cohort


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error: ")]


def _digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder``, the lock and the log included."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- feature folders that `run` refuses (config must refuse them too) --------------------------


def _other_mpp(path: Path) -> None:
    with h5py.File(path, "a") as h5:
        h5.attrs["mpp"] = 1.0  # the other files say 0.5


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    "breaks,fragments",
    [(_other_mpp, ["feature files made differently", "mpp=1"]), (_empty, ["not a readable"])],
    ids=["mixed-mpp", "empty-file"],
)
def test_config_refuses_the_feature_folders_that_run_refuses(tmp_path, breaks, fragments):
    config = small_cohort(tmp_path / "cohort", patients=24)
    bad = feature_path(config.parent / "features", slide_of_split(config, "test"))
    breaks(bad)
    checked = invoke("config", config)
    assert checked.exit_code == 1, checked.output
    said = " ".join(checked.stderr.split())
    assert "missing features.dir: " in said and str(bad) in said
    assert all(f in said for f in fragments), said
    assert "train blocked by features.dir" in said
    # `run` refuses with the same finding, and writes nothing: no run folder at all.
    refused = invoke("run", config, "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(refused, "`bidistill run` cannot start", str(bad), *fragments)
    assert not (tmp_path / "run").exists()


# --- the cohort table: what every stage reads ---------------------------------------------------


def test_label_values_in_neither_list_are_found_by_config_and_stop_run(tmp_path):
    config = small_cohort(tmp_path / "cohort", patients=24)
    table = config.parent / "cohort.csv"
    lines = table.read_text().splitlines()
    column = lines[0].split(",").index("nodal_status")
    cells = lines[3].split(",")
    cells[column] = "N?"
    lines[3] = ",".join(cells)
    table.write_text("\n".join(lines) + "\n")
    checked = invoke("config", config)
    assert checked.exit_code == 1, checked.output
    said = " ".join(checked.stderr.split())
    assert "missing cohort.table" in said and "column 'nodal_status'" in said
    assert "'N?'" in said and "rows 4" in said
    refused = invoke("run", config, "--out", tmp_path / "run")
    assert_one_line_error(refused, str(table), "'nodal_status'", "rows 4")
    assert not (tmp_path / "run").exists()


# --- slides: what `run` tiles and extracts itself ------------------------------------------------


@pytest.fixture(scope="module")
def bcnb_cohort(tmp_path_factory) -> Path:
    """A synthetic BCNB download (10 small JPEG slides without an MPP) prepared as a cohort:
    its config has a `slides` section and no feature file exists. Copy it before editing."""
    from bidistill.cohort.bcnb import prepare_bcnb
    from bidistill.synthetic.bcnb import make_bcnb_folder

    base = tmp_path_factory.mktemp("bcnb")
    root = make_bcnb_folder(
        base / "BCNB", patients=10, seed=3, slide_size=(512, 512), progress=False
    )
    return prepare_bcnb(root, base / "cohort").config_path


def _copy(config: Path, tmp_path: Path, edit=None) -> Path:
    folder = shutil.copytree(config.parent, tmp_path / "cohort")
    copied = folder / config.name
    return edit_config(copied, edit) if edit else copied


def test_config_accepts_slides_without_features_as_run_does(bcnb_cohort, tmp_path):
    config = _copy(bcnb_cohort, tmp_path)
    checked = invoke("config", config)
    assert checked.exit_code == 0, checked.output
    said = " ".join(checked.stderr.split())
    assert "`run` tiles and extracts them first" in said
    assert "tile ready" in said and "extract ready" in said and "train ready" in said
    assert checked.stderr.strip().splitlines()[-1].startswith(f"next: bidistill run {config}")


def test_jpegs_without_an_mpp_are_found_by_config_and_stop_tile_and_run(bcnb_cohort, tmp_path):
    config = _copy(bcnb_cohort, tmp_path, lambda raw: raw["slides"].pop("mpp"))
    first = Path(yaml.safe_load(config.read_text())["slides"]["dir"]) / "1.jpg"
    checked = invoke("config", config)
    assert checked.exit_code == 1, checked.output
    said = " ".join(checked.stderr.split())
    assert f"missing slides.mpp: {first} (and 9 more)" in said
    assert "tile blocked by slides.mpp" in said
    for command in (["tile"], ["run", "--out", tmp_path / "run"]):
        refused = invoke(command[0], config, *command[1:])
        assert_one_line_error(refused, f"`bidistill {command[0]}` cannot start", "slides.mpp")
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in config.parent.iterdir()) == ["cohort.csv", "config.yaml"]


def test_missing_slide_files_are_found_by_config_and_stop_tile_and_run(bcnb_cohort, tmp_path):
    from bidistill.slide_stages import Shard

    source = Path(yaml.safe_load(bcnb_cohort.read_text())["slides"]["dir"])
    slides = shutil.copytree(source, tmp_path / "slides")
    gone = next(s for s in map(str, range(1, 11)) if Shard(0, 5).owns(s))  # in the shard below
    (slides / f"{gone}.jpg").unlink()

    def own_slides(raw):
        raw["slides"].update(dir=str(slides), annotations_dir=str(slides))

    config = _copy(bcnb_cohort, tmp_path, own_slides)
    checked = invoke("config", config)
    assert checked.exit_code == 1, checked.output
    said = " ".join(checked.stderr.split())
    assert f"missing slides.dir: {slides}: no slide file for '{gone}'" in said
    for command in (["tile"], ["run", "--out", tmp_path / "run"]):
        refused = invoke(command[0], config, *command[1:])
        assert_one_line_error(refused, "slides.dir", f"no slide file for '{gone}'")
    assert not (tmp_path / "run").exists() and not (config.parent / "coords").exists()
    # `tile --skip-errors` goes on past the missing file, as before (and lists it at the end).
    skipped = invoke("tile", config, "--skip-errors", "--shard", "0/5")
    assert skipped.exit_code == 1 and "Traceback" not in skipped.output
    assert f"{gone}: {slides}: no slide file for '{gone}'" in " ".join(skipped.output.split())


def test_tile_needs_no_second_class(bcnb_cohort, tmp_path):
    config = _copy(bcnb_cohort, tmp_path)
    table = config.parent / "cohort.csv"
    text = table.read_text().replace("N+(1-2)", "N0").replace("N+(>2)", "N0")
    table.write_text(text)
    tiled = invoke("tile", config, "--shard", "0/4")  # a share of the slides: fast
    assert tiled.exit_code == 0, tiled.output
    assert list((config.parent / "coords").glob("*.h5"))
    checked = invoke("config", config)
    said = " ".join(checked.stderr.split())
    assert checked.exit_code == 1  # training does need both classes
    assert "missing cohort.label" in said and "one class only" in said
    assert "tile ready" in said and "train blocked by cohort.label" in said


# --- a refused rerun leaves its run folder as it was ---------------------------------------------


def test_a_refused_rerun_leaves_the_run_folder_unchanged(run_copy):
    config, run_dir = run_copy
    before = _digests(run_dir)
    (config.parent / "cohort.csv").write_text("patient_id,slide_id\n")  # columns gone
    refused = invoke("run", config, "--out", run_dir, "--no-progress")
    assert_one_line_error(refused, "`bidistill run` cannot start", "nodal_status")
    assert _digests(run_dir) == before  # not even run.log or run.lock


# --- which config file a run folder belongs to --------------------------------------------------


@pytest.fixture
def default_run(tmp_path, monkeypatch) -> Path:
    """A run made with the default --out (runs/<name>), from tmp_path; returns its config."""
    monkeypatch.chdir(tmp_path)
    config = small_cohort(tmp_path / "exp", patients=24, methods=["clinical-only"])
    done = invoke("run", "exp/config.yaml", "--no-progress")
    assert done.exit_code == 0, done.output
    return config


def test_a_copied_config_is_refused_the_run_folder_of_its_original(default_run, tmp_path):
    run_dir = Path("runs") / yaml.safe_load(default_run.read_text())["name"]
    recorded = json.loads((run_dir / "run.json").read_text())["config_file"]
    assert recorded == {"path": str(default_run.resolve()), "relative": "../../exp/config.yaml"}
    copy = edit_config(
        Path(shutil.copy(default_run, default_run.parent / "bigger.yaml")),
        lambda raw: raw["training"].update(epochs=2),
    )
    before = _digests(run_dir)
    refused = invoke("run", "exp/bigger.yaml", "--no-progress")
    assert_one_line_error(
        refused, f"--out {run_dir}", str(default_run.resolve()), "exp/bigger.yaml", "--out"
    )
    assert _digests(run_dir) == before
    # `config` suggests a folder of the copy's own, and that command works as printed.
    checked = invoke("config", copy)
    assert checked.stderr.strip().splitlines()[-1] == (
        f"next: bidistill run {copy} --out runs/bigger"
    )
    # The original config goes on in its folder.
    again = invoke("run", "exp/config.yaml", "--no-progress")
    assert again.exit_code == 0, again.output


def test_a_renamed_config_keeps_its_run_folder(default_run):
    renamed = default_run.rename(default_run.parent / "renamed.yaml")
    again = invoke("run", renamed, "--out", "runs/synthetic", "--no-progress")
    assert again.exit_code == 0, again.output
    recorded = json.loads(Path("runs/synthetic/run.json").read_text())["config_file"]
    assert recorded["path"] == str(renamed.resolve())


def test_a_moved_project_folder_keeps_its_run_folder(run_copy):
    config, run_dir = run_copy  # the run records the original cohort's config, which exists
    again = invoke("run", config, "--out", run_dir, "--no-progress")
    assert again.exit_code == 0, again.output


def test_train_makes_the_same_checks_before_its_run_folder(tmp_path):
    config = small_cohort(tmp_path / "cohort", patients=24)
    gone = feature_path(config.parent / "features", slide_of_split(config, "val"))
    gone.unlink()
    refused = invoke("train", config, "--out", tmp_path / "run")
    assert_one_line_error(refused, "`bidistill train` cannot start", "features.dir", gone.name)
    assert not (tmp_path / "run").exists()
