"""`bcnb prepare --protocol paper`: the published end-to-end protocol, on the authors' patch
folders when they are there, else on tiles of the annotated tumour regions; and a run of it on
a synthetic BCNB folder (a tiny backbone in place of VGG16-BN, so that it trains in seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from bidistill.cli import app
from bidistill.cohort.bcnb import prepare_bcnb
from bidistill.config import load_config
from bidistill.configs import protocol_text
from bidistill.errors import CohortError
from bidistill.synthetic.bcnb import make_bcnb_folder

# The published values, written out by hand (not read from the shipped file).
PUBLISHED = {
    ("features", "encoder"): "vgg16-bn",
    ("tiling", "patch_size"): 256,
    ("tiling", "max_blank_fraction"): 0.3,
    ("training", "mode"): "end-to-end",
    ("training", "batch_size"): 1,
    ("training", "lr"): 1e-4,
    ("training", "weight_decay"): 1e-3,
    ("training", "epochs"): 200,
    ("training", "seed"): 8888,
}
PUBLISHED_E2E = {
    "bag_size": 10,
    "input_size": 224,
    "optimizer": "sgd",
    "momentum": 0.3,
    "scheduler": "cosine-restarts",
    "restart_epochs": 20,
    "restart_mult": 2,
    "reduction": "mean",
}


@pytest.fixture(scope="module")
def bcnb_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bcnb-paper")
    return make_bcnb_folder(out, patients=12, seed=4, slide_size=(512, 512), progress=False)


def test_the_shipped_protocol_holds_the_published_settings(bcnb_root, tmp_path):
    assert "github.com/bupt-ai-cz/BALNMP" in protocol_text("bcnb-paper")  # sources are cited
    report = prepare_bcnb(bcnb_root, tmp_path, protocol="paper")
    config = load_config(report.config_path)
    for (section, key), value in PUBLISHED.items():
        assert getattr(getattr(config, section), key) == value, (section, key)
    for key, value in PUBLISHED_E2E.items():
        assert getattr(config.training.end_to_end, key) == value, key
    assert [m.name for m in config.methods][0] == "bd" and config.name == "bcnb-aln-paper"
    # No paper_patches/: 256 px tiles inside the tumour annotations of the WSIs, at level 0.
    assert config.slides.dir == (bcnb_root / "WSIs").resolve()
    assert config.tiling.mask == "annotations" and config.tiling.mpp is None
    assert "256 px tiles of the annotated tumour regions" in report.format()


def _cut_paper_patches(root: Path, size: int = 48) -> Path:
    """The layout of the authors' paper_patches.zip: patches/<id>/<id>_<k>_<x>_<y>.jpg."""
    target = root / "paper_patches" / "patches"
    for jpg in sorted((root / "WSIs").glob("*.jpg")):
        folder = target / jpg.stem
        folder.mkdir(parents=True)
        with Image.open(jpg) as image:
            pixels = np.asarray(image.convert("RGB"))
        for k, (x, y) in enumerate([(100, 100), (200, 150), (300, 200), (150, 250)]):
            crop = Image.fromarray(pixels[y : y + size, x : x + size])
            crop.save(folder / f"{jpg.stem}_{k}_{x}_{y}.jpg", quality=90)
    return target


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # DeLong on 3 test patients
def test_paper_protocol_trains_end_to_end_on_the_authors_patches(bcnb_root, tmp_path):
    root = Path(shutil.copytree(bcnb_root, tmp_path / "BCNB"))
    patches = _cut_paper_patches(root)
    runner = CliRunner()
    out = tmp_path / "exp"
    result = runner.invoke(
        app, ["bcnb", "prepare", "--root", str(root), "--out", str(out), "--protocol", "paper"]
    )
    assert result.exit_code == 0, result.output
    assert "the authors' patches (paper_patches/" in result.output
    assert "next: bidistill tile" in result.output
    raw = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert raw["slides"]["dir"] == str(patches.resolve())
    table = pd.read_csv(out / "cohort.csv", dtype=str)
    assert (table["slide_id"] == table["patient_id"]).all()
    # The protocol as shipped, made small: a tiny random-init backbone, one epoch, two methods.
    raw["features"] = {"encoder": "timm:test_convnext", "random_init": True}
    raw["tiling"]["patch_size"] = 48
    raw["methods"] = ["bd", "wsi-only"]
    raw["training"].update({"epochs": 1, "num_workers": 0, "device": "cpu", "lr": 0.01})
    raw["training"]["end_to_end"].update({"bag_size": 2, "input_size": 32, "eval_batch": 8})
    raw["evaluation"] = {"mask_seeds": 2, "bootstrap": 20}
    (out / "config.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = runner.invoke(app, ["run", str(out / "config.yaml"), "--out", str(out / "run")])
    assert result.exit_code == 0, result.output
    predictions = pd.read_csv(out / "run" / "bd" / "predictions.csv")
    assert len(predictions) == 12 and predictions["prob_absent"].notna().all()
    assert (out / "run" / "report.html").is_file()


def test_paper_protocol_needs_slides(bcnb_root, tmp_path):
    root = Path(shutil.copytree(bcnb_root, tmp_path / "BCNB"))
    shutil.rmtree(root / "WSIs")
    with pytest.raises(CohortError, match="paper protocol trains on the slides"):
        prepare_bcnb(root, tmp_path / "out", protocol="paper")
    with pytest.raises(CohortError, match="unknown protocol 'papers'"):
        prepare_bcnb(root, tmp_path / "out", protocol="papers")
