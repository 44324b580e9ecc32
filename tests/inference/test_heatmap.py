"""Heatmaps, montages and exports: the map puts each tile's score on its pixels (no blur), the
hottest tiles are the planted key instances, the GeoJSON is valid and QuPath-shaped."""

from __future__ import annotations

import json

import geojson
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from shapely.geometry import shape
from typer.testing import CliRunner

import bidistill
from bidistill.cli import app
from bidistill.inference.heatmap import score_grid, top_and_bottom
from bidistill.synthetic.features import hottest_tile_key_shares

from ..conftest import SHARED_DATA
from ..slides.helpers import tissue_image, write_pyramid_tiff
from .helpers import saved_predictions

runner = CliRunner()


def heatmap(*args: str):
    return runner.invoke(app, ["heatmap", *map(str, args)])


def test_each_pixel_gets_its_tiles_mean_and_nothing_is_blurred():
    coords = np.array([[0, 0], [100, 0], [0, 100], [100, 100]])
    values = np.array([0.1, 0.4, 0.7, 1.0])
    grid = score_grid(coords, values, 100, (10.0, 10.0), (25, 25))
    np.testing.assert_array_equal(grid[:10, :10], 0.1)
    np.testing.assert_array_equal(grid[10:20, 10:20], 1.0)
    assert np.isnan(grid[20:, :]).all() and np.isnan(grid[:, 20:]).all()
    assert set(np.unique(grid[:20, :20])) == set(values)  # no value between two tiles
    # overlapping tiles (stride half a tile): a pixel averages the tiles over it, a finer map
    fine = np.array([[x, y] for y in range(0, 150, 50) for x in range(0, 150, 50)])
    grid = score_grid(fine, np.arange(9.0), 100, (10.0, 10.0), (20, 20))
    assert grid[7, 7] == pytest.approx(np.mean([0, 1, 3, 4]))
    assert grid[0, 0] == 0 and grid[19, 19] == 8
    assert len(np.unique(grid)) > 9  # finer than the 9 tiles


def test_top_and_bottom_tiles_are_disjoint_and_ordered():
    top, bottom = top_and_bottom(np.array([0.3, 0.9, 0.1, 0.5, 0.7]), 3)
    assert top.tolist() == [1, 4] and bottom.tolist() == [2, 0]


@pytest.mark.slow
@pytest.mark.parametrize("score", ["attention", "leave-one-out"])
def test_the_hottest_tiles_are_the_planted_key_instances(demo_run, demo_cohort, score):
    """On the test patients, the top 10% of each slide's tiles by attention (what the heatmap
    and its tiles.csv show; or by each tile's leave-one-out effect, what each branch's
    log-odds loses without it) are key instances far more often than the slide's share of key
    instances (chance), in both of BD's branches."""
    test = saved_predictions(demo_run, "bd").index.tolist()
    run = bidistill.load_run(demo_run)
    features, table = demo_cohort / "features", demo_cohort / "cohort.csv"
    patients = run.attention(features, table, patients=test, score=score)
    slides = [slide for patient in patients for slide in patient.slides]
    for branch in ("multi-modal", "single-modal"):
        column = f"{slides[0].column}_{branch}"  # attention_<branch>, effect_<branch>
        hits, chance = hottest_tile_key_shares(slides, demo_cohort, column)
        assert len(hits) >= 15
        assert np.mean(hits) > max(2 * np.mean(chance), 0.5), (branch, hits, chance)


@pytest.mark.slow
def test_a_leave_one_out_map_draws_what_each_branch_loses_without_the_tile(
    demo_run, demo_cohort, tmp_path
):
    """Each tile's value is the branch's log-odds for the whole bag minus that without the
    tile, as the run's model itself gives it on the bag with the tile masked."""
    import torch

    from bidistill.training.data import FileBag

    from .test_leave_one_out import masked_effects

    feature_file = demo_cohort / "features" / "S0003.h5"
    out = tmp_path / "out"
    result = heatmap("--run", demo_run, "--features", feature_file, "--score", "leave-one-out",
                     "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    tiles = pd.read_csv(out / "S0003.tiles.csv")
    assert {"effect", "effect_multi-modal", "effect_single-modal"} <= set(tiles.columns)
    assert not any(c.startswith("attention") for c in tiles.columns)
    assert (tiles["branch"] == "single-modal").all()  # a file alone: no clinical data
    np.testing.assert_array_equal(tiles["effect"], tiles["effect_single-modal"])
    method = bidistill.load_run(demo_run).folds[0].method
    files = FileBag([feature_file])
    bag = next(files.chunks(files.n_instances)).astype(np.float32)
    blank, valid = method.blank_clinical, torch.zeros(method.dims.n_clinical_features, dtype=bool)
    for branch, present in (("single-modal", False), ("multi-modal", True)):
        expected = masked_effects(method, bag, blank, valid, present)
        np.testing.assert_allclose(tiles[f"effect_{branch}"], expected, rtol=1e-3, atol=1e-5)
    assert tiles["effect_multi-modal"].abs().max() > 1e-3  # it moves the prediction
    collection = geojson.loads((out / "S0003.tiles.geojson").read_text())
    measured = collection["features"][0]["properties"]["measurements"]
    assert measured["effect"] == pytest.approx(tiles["effect"][0])
    assert (out / "S0003.heatmap.png").is_file()


@pytest.fixture(scope="module")
def slide_image(demo_cohort, tmp_path_factory):
    """A pyramidal TIFF at 0.5 µm/px under the tiles of the smallest synthetic slide, whose
    coords form a grid of 256-px tiles from (0, 0)."""
    import h5py

    features = demo_cohort / "features"
    sizes = {p.stem: h5py.File(p)["coords"][()].max(axis=0) for p in features.glob("S00*.h5")}
    slide_id = min(sizes, key=lambda s: sizes[s].max())
    width, height = (sizes[slide_id] + 256).tolist()
    rgb, truth = tissue_image(height, width, seed=2)
    folder = tmp_path_factory.mktemp("slides")
    write_pyramid_tiff(folder / f"{slide_id}.tif", rgb, mpp=0.5, tile=256)
    return slide_id, folder, truth


@pytest.mark.slow
def test_maps_and_exports_over_a_slide_file(demo_run, demo_cohort, slide_image, tmp_path):
    slide_id, folder, truth = slide_image
    feature_file = demo_cohort / "features" / f"{slide_id}.h5"
    result = heatmap(
        "--run", demo_run, "--features", feature_file, "--slides", folder, "--out", tmp_path,
        "--top-k", 4,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    names = {p.name for p in tmp_path.iterdir()}
    kinds = ("heatmap.png", "montage.png", "tiles.csv", "tiles.geojson", "tissue.geojson")
    assert {f"{slide_id}.{k}" for k in kinds} | {"predictions.csv"} == names
    with Image.open(tmp_path / f"{slide_id}.heatmap.png") as png:
        assert png.width > 1000  # two panels, multi-modal and single-modal
    tiles = pd.read_csv(tmp_path / f"{slide_id}.tiles.csv")

    collection = geojson.loads((tmp_path / f"{slide_id}.tiles.geojson").read_text())
    assert collection.is_valid, collection.errors()
    assert len(collection["features"]) == len(tiles)
    first = collection["features"][0]
    assert first["properties"]["objectType"] == "detection"
    assert first["properties"]["measurements"]["attention"] == pytest.approx(tiles["attention"][0])
    x, y = tiles.loc[0, ["x", "y"]]
    assert shape(first["geometry"]).bounds == (x, y, x + 256, y + 256)

    tissue = geojson.loads((tmp_path / f"{slide_id}.tissue.geojson").read_text())
    assert tissue.is_valid, tissue.errors()
    polygons = [shape(f["geometry"]) for f in tissue["features"]]
    assert 1 <= len(polygons) <= 3 and all(p.is_valid for p in polygons)
    assert {f["properties"]["objectType"] for f in tissue["features"]} == {"annotation"}
    area = sum(p.area for p in polygons)
    assert area == pytest.approx(truth.sum(), rel=0.15)  # the two tissue ellipses


@pytest.mark.slow
def test_a_patch_folder_gets_the_montage(demo_run, tmp_path):
    """Pre-cut patches: tile i is file i (coords (i, 0)); no geometry, so no map or GeoJSON."""
    import h5py

    rng = np.random.default_rng(0)
    folder = tmp_path / "slides" / "PF1"
    folder.mkdir(parents=True)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            folder / f"{i:02d}.png"
        )
    features = tmp_path / "PF1.h5"
    with h5py.File(features, "w") as h5:
        h5["features"] = rng.normal(size=(12, 32)).astype(np.float32)
        h5["coords"] = np.stack([np.arange(12), np.zeros(12, int)], axis=1)
        h5.attrs.update({"encoder": "synthetic", "patch_size": 256, "mpp": 0.5})
    out = tmp_path / "out"
    result = heatmap("--run", demo_run, "--features", features, "--slides", folder, "--out", out)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {
        "PF1.montage.png",
        "PF1.tiles.csv",
        "predictions.csv",
    }
    # Tile i is patch i, each with the weight the run gives it (summing to 1 over the slide).
    tiles = pd.read_csv(out / "PF1.tiles.csv")
    np.testing.assert_array_equal(tiles["x"], np.arange(12))
    (patient,) = bidistill.load_run(demo_run).attention(features)
    np.testing.assert_allclose(tiles["attention"], patient.slides[0].scores[patient.branch])
    assert tiles["attention"].sum() == pytest.approx(1, abs=1e-5)
    with Image.open(out / "PF1.montage.png") as png:  # the top and bottom rows of patches
        assert png.height > 2 * 64 and png.width > 4 * 64


def test_an_unreadable_slide_is_refused(demo_run, demo_cohort, tmp_path):
    bad = tmp_path / "S0000.svs"
    bad.write_bytes(b"not a slide at all" * 100)
    result = heatmap(
        "--run", demo_run, "--features", demo_cohort / "features" / "S0000.h5",
        "--slides", bad, "--out", tmp_path / "out",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "error:" in result.output and "S0000.svs" in result.output


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED_DATA / "CMU-1-Small-Region.svs").is_file(),
    reason="../shared/data/CMU-1-Small-Region.svs is not here (a user's clone has none)",
)
def test_a_real_svs_gets_its_map_and_tissue_contours(demo_run, tmp_path):
    """Features at the tiles bidistill's tiling keeps on a real Aperio slide."""
    import h5py

    from bidistill.config import TilingConfig
    from bidistill.slides import open_slide, tile_slide

    svs = SHARED_DATA / "CMU-1-Small-Region.svs"
    with open_slide(svs) as slide:
        tiling = tile_slide(slide, TilingConfig(patch_size=256, mpp=0.5))
    n = len(tiling.coords)
    assert n > 10
    features = tmp_path / "CMU-1-Small-Region.h5"
    with h5py.File(features, "w") as h5:
        h5["features"] = np.random.default_rng(1).normal(size=(n, 32)).astype(np.float32)
        h5["coords"] = tiling.coords
        h5.attrs.update({"encoder": "synthetic", "patch_size": 256, "mpp": 0.5})
    out = tmp_path / "out"
    result = heatmap("--run", demo_run, "--features", features, "--slides", svs, "--out", out)
    assert result.exit_code == 0, result.output
    tissue = json.loads((out / "CMU-1-Small-Region.tissue.geojson").read_text())
    assert tissue["features"] and all(shape(f["geometry"]).is_valid for f in tissue["features"])
    tiles = geojson.loads((out / "CMU-1-Small-Region.tiles.geojson").read_text())
    assert tiles.is_valid and len(tiles["features"]) == n
    side = tiling.spec.size_level0
    assert shape(tiles["features"][0]["geometry"]).bounds[2] - tiling.coords[0][0] == side
