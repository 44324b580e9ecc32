"""The synthetic BCNB folder: exact layout, messy values, the label in the pixels, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openpyxl
import pytest
from PIL import Image, ImageDraw
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from bidistill.cli import app
from bidistill.synthetic.bcnb import make_bcnb_folder, signal_oracle_auc

COLUMNS = [
    "Patient ID",
    "Age(years)",
    "Tumour Size(cm)",
    "Tumour Type",
    "ER",
    "PR",
    "HER2",
    "HER2 Expression",
    "Histological grading",
    "Surgical",
    "Ki67",
    "Molecular subtype",
    "Number of lymph node metastases",
    "ALN status",
]
SMALL = {"slide_size": (640, 512), "progress": False}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _rows(root: Path) -> list[dict]:
    sheet = openpyxl.load_workbook(root / "patient-clinical-data.xlsx").worksheets[0]
    header, *rows = sheet.iter_rows(values_only=True)
    return [dict(zip(header, row)) for row in rows]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_bcnb_folder(tmp_path_factory.mktemp("bcnb"), patients=24, seed=5, **SMALL)


@pytest.fixture(scope="module")
def big_table(tmp_path_factory) -> Path:
    """Clinical part only, large enough to hold every kind of messy value."""
    out = tmp_path_factory.mktemp("bcnb_table")
    return make_bcnb_folder(out, patients=300, seed=0, slides=False, progress=False)


def test_same_seed_gives_identical_bytes_in_every_file(tmp_path):
    first = _files(make_bcnb_folder(tmp_path / "a", patients=10, seed=7, **SMALL))
    second = _files(make_bcnb_folder(tmp_path / "b", patients=10, seed=7, **SMALL))
    assert len(first) == 1 + 3 + 2 * 10
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name


def test_different_seed_gives_different_files(tmp_path):
    first = _files(make_bcnb_folder(tmp_path / "a", patients=10, seed=1, **SMALL))
    second = _files(make_bcnb_folder(tmp_path / "b", patients=10, seed=2, **SMALL))
    assert first.keys() == second.keys()
    assert first["patient-clinical-data.xlsx"] != second["patient-clinical-data.xlsx"]
    for stem in ("1", "2", "10"):
        assert first[f"WSIs/{stem}.jpg"] != second[f"WSIs/{stem}.jpg"]
        assert first[f"WSIs/{stem}.json"] != second[f"WSIs/{stem}.json"]


def test_xlsx_has_the_14_bcnb_columns_and_valid_values(big_table):
    sheet = openpyxl.load_workbook(big_table / "patient-clinical-data.xlsx").worksheets[0]
    header = next(sheet.iter_rows(values_only=True))
    assert list(header) == COLUMNS
    rows = _rows(big_table)
    assert [r["Patient ID"] for r in rows] == list(range(1, 301))
    assert {r["ALN status"] for r in rows} == {"N0", "N+(1-2)", "N+(>2)"}
    for column in ("ER", "PR", "HER2"):
        assert {r[column] for r in rows} == {"Positive", "Negative"}
    assert {str(r["HER2 Expression"]) for r in rows} == {"0", "1+", "2+", "3+"}
    assert {r["Histological grading"] for r in rows} == {1, 2, 3, None}
    assert {r["Surgical"] for r in rows} == {
        "Axillary lymph node dissection",
        "Sentinel lymph node biopsy",
    }
    assert {r["Tumour Type"] for r in rows} == {
        "Invasive ductal carcinoma",
        "Invasive lobular carcinoma",
        "Other type",
    }
    assert {r["Molecular subtype"] for r in rows} == {
        "Luminal A",
        "Luminal B",
        "HER2(+)",
        "Triple negative",
    }


def test_xlsx_values_are_messy_like_bcnb(big_table):
    rows = _rows(big_table)
    ki67 = [r["Ki67"] for r in rows]
    texts = [k for k in ki67 if isinstance(k, str)]
    assert any("＜" in k or "＞" in k for k in texts), "full-width censored values"
    assert any(k.startswith("<") for k in texts)
    assert any("-" in k and k.endswith("%") for k in texts), "ranges such as 30-40%"
    assert any(isinstance(k, float) for k in ki67), "fractions stored as numbers"
    assert None in ki67
    grades = [r["Histological grading"] for r in rows]
    assert 0.1 < grades.count(None) / len(grades) < 0.4
    assert any(isinstance(r["Tumour Size(cm)"], str) and "," in r["Tumour Size(cm)"] for r in rows)


def test_clinical_values_follow_receptor_and_nodal_logic(big_table):
    for r in _rows(big_table):
        if r["Molecular subtype"] == "Triple negative":
            assert (r["ER"], r["PR"], r["HER2"]) == ("Negative",) * 3
        if r["HER2"] == "Positive":
            assert r["HER2 Expression"] in ("2+", "3+")
        nodes = r["Number of lymph node metastases"]
        expected = {"N0": nodes == 0, "N+(1-2)": nodes in (1, 2), "N+(>2)": nodes > 2}
        assert expected[r["ALN status"]], r


def test_split_files_have_crlf_and_cover_each_patient_once(folder):
    seen = []
    for name in ("train_id.txt", "val_id.txt", "test_id.txt"):
        data = (folder / "dataset-splitting" / name).read_bytes()
        assert data.endswith(b"\r\n") and data.count(b"\r\n") == data.count(b"\n")
        ids = data.decode().split("\r\n")[:-1]
        assert ids, name
        seen += ids
    assert sorted(seen, key=int) == [str(i) for i in range(1, 25)]


def test_every_split_has_both_aln_classes(folder):
    status = {str(r["Patient ID"]): r["ALN status"] for r in _rows(folder)}
    for name in ("train_id.txt", "val_id.txt", "test_id.txt"):
        ids = (folder / "dataset-splitting" / name).read_text().split()
        assert {status[i] == "N0" for i in ids} == {True, False}, name


def test_slides_and_annotations_have_the_bcnb_format(folder):
    for pid in range(1, 25):
        image = Image.open(folder / "WSIs" / f"{pid}.jpg")
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (640, 512)
        annotation = json.loads((folder / "WSIs" / f"{pid}.json").read_text())
        assert set(annotation) == {"positive", "negative"}
        assert annotation["positive"], pid
        for region in annotation["positive"]:
            vertices = np.array(region["vertices"])
            assert isinstance(region["name"], str)
            assert vertices.ndim == 2 and vertices.shape[1] == 2 and len(vertices) >= 3
            assert (vertices >= 0).all() and (vertices < [640, 512]).all()


def _tumour_darkness(folder: Path, pid: int) -> float:
    """Share of dark (nucleus-like) pixels inside the slide's tumour polygons."""
    pixels = np.asarray(Image.open(folder / "WSIs" / f"{pid}.jpg")).astype(int)
    mask = Image.new("L", (pixels.shape[1], pixels.shape[0]), 0)
    for region in json.loads((folder / "WSIs" / f"{pid}.json").read_text())["positive"]:
        ImageDraw.Draw(mask).polygon([tuple(v) for v in region["vertices"]], fill=1)
    inside = np.asarray(mask).astype(bool)
    dark = pixels.sum(axis=2) < 330
    return float(dark[inside].mean())


def test_aln_status_is_visible_inside_the_tumour_polygons(folder):
    status = {r["Patient ID"]: r["ALN status"] for r in _rows(folder)}
    darkness = [_tumour_darkness(folder, pid) for pid in range(1, 25)]
    node_positive = [status[pid] != "N0" for pid in range(1, 25)]
    assert roc_auc_score(node_positive, darkness) > 0.9


def test_zero_signal_hides_the_label(tmp_path):
    folder = make_bcnb_folder(tmp_path, patients=24, seed=5, signal=0.0, **SMALL)
    status = {r["Patient ID"]: r["ALN status"] for r in _rows(folder)}
    darkness = [_tumour_darkness(folder, pid) for pid in range(1, 25)]
    node_positive = [status[pid] != "N0" for pid in range(1, 25)]
    assert roc_auc_score(node_positive, darkness) < 0.85


def test_signal_noise_blurs_the_label_in_the_slides(tmp_path):
    """The demo's noise (``DEMO_SLIDE_NOISE``) leaves an oracle of the planted strength at AUC
    ~0.85; the default leaves the classes almost apart; the slides follow the setting."""
    from bidistill.experiment.demo import DEMO_SLIDE_NOISE

    assert signal_oracle_auc() > 0.99
    assert 0.83 < signal_oracle_auc(signal_noise=DEMO_SLIDE_NOISE) < 0.87
    folder = make_bcnb_folder(tmp_path, patients=24, seed=5, signal_noise=3.0, **SMALL)
    status = {r["Patient ID"]: r["ALN status"] for r in _rows(folder)}
    darkness = [_tumour_darkness(folder, pid) for pid in range(1, 25)]
    node_positive = [status[pid] != "N0" for pid in range(1, 25)]
    assert roc_auc_score(node_positive, darkness) < 0.85
    with pytest.raises(ValueError, match="signal_noise"):
        make_bcnb_folder(tmp_path, patients=10, signal_noise=-1.0, **SMALL)


def test_slides_have_grey_glass_tissue_and_blue_pen_marks(folder):
    blue_slides = 0
    for pid in range(1, 25):
        pixels = np.asarray(Image.open(folder / "WSIs" / f"{pid}.jpg")).astype(int)
        r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
        grey = (np.abs(r - g) < 8) & (np.abs(g - b) < 8) & (r > 215)
        pink = (r - g > 30) & (b > g)
        assert 0.2 < grey.mean() < 0.9 and pink.mean() > 0.1, pid
        blue_slides += bool(((b - r > 80) & (b - g > 60)).sum() > 50)
    assert 0 < blue_slides < 24


def test_too_few_patients_is_refused(tmp_path):
    with pytest.raises(ValueError, match="patients must be >= 10"):
        make_bcnb_folder(tmp_path, patients=4, progress=False)


def test_cli_writes_the_folder(tmp_path):
    out = tmp_path / "synth"
    result = CliRunner().invoke(
        app,
        [
            "synth",
            "bcnb",
            "--out",
            str(out),
            "--patients",
            "10",
            "--seed",
            "3",
            "--slide-width",
            "512",
            "--slide-height",
            "512",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(list((out / "WSIs").glob("*.jpg"))) == 10
    reference = make_bcnb_folder(
        tmp_path / "ref", patients=10, seed=3, slide_size=(512, 512), progress=False
    )
    assert _files(out) == _files(reference)
