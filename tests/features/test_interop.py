"""CLAM and TRIDENT files: TRIDENT's features train, predict and draw heatmaps with the encoder
name the README gives, and bidistill's coords and feature files pass both tools' readers.

The readers below reproduce, read for read, what CLAM (``dataset_modules/dataset_h5.py``
``Whole_Slide_Bag_FP``, ``wsi_core/wsi_utils.py`` ``StitchCoords``) and TRIDENT
(``trident/IO.py`` ``read_coords``, ``wsi_objects/WSI.py`` ``extract_patch_features`` /
``extract_slide_features``, ``wsi_objects/WSIPatcher.py``, ``slide_encoder_models/load.py``)
take from a file; the TRIDENT writer reproduces ``trident/IO.py`` ``save_h5``/``coords_to_h5``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from bidistill.cli import app
from bidistill.config import FeaturesConfig, TilingConfig
from bidistill.features import read_feature_file
from bidistill.features.encoders import load_encoder
from bidistill.features.extract import ExtractionJob, extract_features
from bidistill.features.identity import FeatureIdentity, read_identity
from bidistill.slides import SlideJob, coords_path, open_slide, read_coords, tile_cohort

from ..slides.helpers import tissue_image, write_pyramid_tiff
from .trident import write_trident_features

runner = CliRunner()


def to_trident_layout(features_dir: Path, encoder: str | None, *, dim: int | None = None) -> None:
    """Rewrite every bidistill feature file of a folder as TRIDENT writes it (same values; with
    ``dim``, random features of that width instead)."""
    rng = np.random.default_rng(0)
    for path in sorted(features_dir.glob("*.h5")):
        got = read_feature_file(path)
        features = got.features
        if dim is not None:
            features = rng.standard_normal((len(features), dim)).astype(np.float32)
        path.unlink()
        # the generator's grid is 256 px at 0.5 µm/px; TRIDENT's slide is 40x (0.25 µm/px)
        write_trident_features(path, features, got.coords * 2, encoder=encoder)


# --- CLAM's and TRIDENT's readers -----------------------------------------------------------------


def clam_whole_slide_bag_fp(path: Path) -> tuple[int, int, int]:
    """CLAM ``Whole_Slide_Bag_FP.__init__``: (patch_level, patch_size, length)."""
    with h5py.File(path, "r") as f:
        dset = f["coords"]
        patch_level = f["coords"].attrs["patch_level"]
        patch_size = f["coords"].attrs["patch_size"]
        length = len(dset)
    return int(patch_level), int(patch_size), length


def clam_stitch_coords(path: Path) -> tuple[str, int, int]:
    """CLAM ``StitchCoords``: (name, patch_size, patch_level)."""
    with h5py.File(path, "r") as file:
        dset = file["coords"]
        return dset.attrs["name"], int(dset.attrs["patch_size"]), int(dset.attrs["patch_level"])


def trident_patcher(path: Path) -> dict:
    """TRIDENT ``read_coords`` + ``extract_patch_features``/``visualize_coords``: the Trident
    format must be complete (else TRIDENT falls back to CLAM's legacy reader), and
    ``WSIPatcher`` turns the magnifications into the level-0 patch size."""
    with h5py.File(path, "r") as f:
        coords_attrs = dict(f["coords"].attrs)
        coords = f["coords"][:]
    patch_size = coords_attrs.get("patch_size")
    level0_magnification = coords_attrs.get("level0_magnification")
    target_magnification = coords_attrs.get("target_magnification")
    if None in (patch_size, level0_magnification, target_magnification):
        raise KeyError("Missing attributes in coords_attrs.")
    downsample = (10 / target_magnification) / (10 / level0_magnification)
    return {
        "patch_size_src": round(patch_size * downsample),
        "overlap": coords_attrs.get("overlap", 0),
        "coords": coords,
        "attrs": coords_attrs,
    }


def trident_slide_encoder_batch(path: Path) -> dict:
    """TRIDENT ``extract_slide_features``: features, coords and the coords attributes that the
    slide encoders (TITAN, GigaPath, ...) and the heatmap tutorial index by name."""
    with h5py.File(path, "r") as f:
        coords = f["coords"][:]
        patch_features = f["features"][:]
        coords_attrs = dict(f["coords"].attrs)
    coords_attrs["patch_size_level0"] = int(coords_attrs["patch_size_level0"])
    return {"features": patch_features, "coords": coords, "attributes": coords_attrs}


# --- bidistill's files in their readers -----------------------------------------------------------


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> Path:
    """A 0.5 µm/px pyramidal TIFF tiled at 1 µm/px (read from pyramid level 1) and extracted by
    bidistill with a tiny random-init timm model."""
    root = tmp_path_factory.mktemp("ours")
    (root / "slides").mkdir()
    write_pyramid_tiff(root / "slides" / "A.tif", tissue_image(600, 800, seed=1)[0], mpp=0.5)
    tile_cohort(
        [SlideJob("A", root / "slides" / "A.tif")],
        TilingConfig(coords_dir=root / "coords", patch_size=64, mpp=1.0),
        progress=False,
    )
    encoder = load_encoder("timm:test_vit", random_init=True)
    job = ExtractionJob(
        slide_id="A",
        slide_path=root / "slides" / "A.tif",
        coords_path=coords_path(root / "coords", "A"),
        target=root / "features" / "A.h5",
        mpp=None,
    )
    features = FeaturesConfig(dir=root / "features", encoder="timm:test_vit", random_init=True)
    extract_features([job], features, cache_dir=root / ".cache", encoder=encoder, progress=False)
    return root


@pytest.mark.parametrize("kind", ["coords", "features"])
def test_our_files_pass_clams_reader(ours, kind):
    import openslide

    path = ours / kind / "A.h5"
    patch_level, patch_size, length = clam_whole_slide_bag_fp(path)
    tiles = read_coords(ours / "coords" / "A.h5")
    assert (patch_level, patch_size, length) == (1, 64, len(tiles.coords))
    assert clam_stitch_coords(path) == ("A", 64, 1)
    # CLAM's __getitem__ reads patch_size pixels at patch_level: the very tile bidistill encodes.
    x, y = (int(v) for v in tiles.coords[len(tiles.coords) // 2])
    with openslide.OpenSlide(str(ours / "slides" / "A.tif")) as wsi:
        clam_tile = np.asarray(
            wsi.read_region((x, y), patch_level, (patch_size, patch_size)).convert("RGB")
        )
    with open_slide(ours / "slides" / "A.tif") as slide:
        our_tile = slide.read_tile(x, y, tiles.patch_size_level0, tiles.patch_size)
    assert np.abs(clam_tile.astype(int) - our_tile.astype(int)).max() <= 2


@pytest.mark.parametrize("kind", ["coords", "features"])
def test_our_files_pass_tridents_readers(ours, kind):
    path = ours / kind / "A.h5"
    tiles = read_coords(ours / "coords" / "A.h5")
    patcher = trident_patcher(path)
    assert patcher["patch_size_src"] == tiles.patch_size_level0 == 128
    assert patcher["overlap"] == 0
    np.testing.assert_array_equal(patcher["coords"], tiles.coords)
    attrs = patcher["attrs"]
    assert attrs["target_magnification"] == 10.0 and attrs["level0_magnification"] == 20.0
    assert (attrs["level0_width"], attrs["level0_height"]) == (800, 600)
    if kind == "features":
        batch = trident_slide_encoder_batch(path)
        assert batch["attributes"]["patch_size_level0"] == 128
        assert batch["features"].shape == (len(tiles.coords), 64)


def test_features_without_a_slide_carry_what_is_known(synth_cohort):
    """Features written without a coords file (the synthetic generator) still carry CLAM's
    attributes and TRIDENT's target magnification."""
    path = next((synth_cohort.parent / "features").glob("*.h5"))
    assert clam_whole_slide_bag_fp(path)[:2] == (0, 256)
    with h5py.File(path, "r") as f:
        assert f["coords"].attrs["target_magnification"] == 20.0


# --- TRIDENT's features through every stage -------------------------------------------------------


def test_trident_names_are_read_as_the_registrys(tmp_path):
    path = write_trident_features(
        tmp_path / "s.h5", np.zeros((2, 4), np.float32), np.zeros((2, 2)), encoder="uni_v1"
    )
    assert read_identity(path) == FeatureIdentity(encoder="uni", patch_size=256, mpp=0.5)
    for name, ours in [
        ("uni_v2", "uni2-h"),
        ("hoptimus0", "h-optimus-0"),
        ("gigapath", "prov-gigapath"),
        ("virchow2", "virchow2"),
        ("conch_v15", "conch_v15"),
    ]:
        assert FeatureIdentity(encoder=name).encoder == ours
    nameless = write_trident_features(
        tmp_path / "n.h5", np.zeros((2, 4), np.float32), np.zeros((2, 2)), encoder=None
    )
    assert read_identity(nameless).encoder is None  # TRIDENT's 'None' is no name


@pytest.mark.slow
def test_trident_uni_features_run_predict_and_draw_heatmaps(tmp_path):
    """TRIDENT's UNI features (1024-d, ``uni_v1`` on ``features``) with ``features.encoder:
    uni``, as the README says: `run`, `predict` and `heatmap` all accept them."""
    from bidistill.synthetic.features import make_feature_cohort

    config = make_feature_cohort(
        tmp_path / "cohort", patients=40, seed=2, dim=8, instances=(4, 8), two_slide_share=0.0
    )
    to_trident_layout(config.parent / "features", "uni_v1", dim=1024)
    raw = yaml.safe_load(config.read_text())
    raw["features"]["encoder"] = "uni"
    raw["methods"] = ["bd"]
    raw["training"].update(epochs=1, patience=1, batch_size=8)
    raw["evaluation"] = {"mask_seeds": 1, "bootstrap": 10, "missing_rates": [0.0, 1.0]}
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = tmp_path / "run"

    result = runner.invoke(app, ["run", str(config), "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output

    features = config.parent / "features"
    result = runner.invoke(
        app,
        [
            "predict",
            "--run",
            str(run),
            "--features",
            str(features),
            "--out",
            str(tmp_path / "p.csv"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.csv").is_file()

    one = sorted(features.glob("*.h5"))[0]
    shutil.copy(one, tmp_path / one.name)
    result = runner.invoke(
        app,
        [
            "heatmap",
            "--run",
            str(run),
            "--features",
            str(tmp_path / one.name),
            "--out",
            str(tmp_path / "maps"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "maps" / f"{one.stem}.heatmap.png").is_file()
    tiles = pd.read_csv(tmp_path / "maps" / f"{one.stem}.tiles.csv")
    assert set(tiles["size"]) == {512}  # TRIDENT's patch_size_level0, read from `coords`
