"""The report as a reader sees it: opened in real headless Chromium, offline."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from bidistill._io import write_text
from bidistill.evaluation import evaluate_run

from .chromium import chromium_binary, open_page
from .synthetic import write_run

CHROMIUM = chromium_binary()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)"
)
FIGURES = ("auc_vs_missing", "roc", "calibration")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("report"), n_patients=200)
    write_text(
        run / "config.yaml",
        "\n".join(
            [
                "name: report-test",
                "cohort:",
                "  table: cohort.csv",
                "  patient_column: id",
                "  label: {column: y, positive: ['1']}",
                "methods: [bd, wsi-only, fusion-zero, clinical-only]",
                "evaluation: {mask_seeds: 3, bootstrap: 200}",
                "",
            ]
        ),
    )
    evaluate_run(run)
    return run


def test_html_references_nothing_outside_itself(report_dir) -> None:
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", page)
    assert len(sources) == len(FIGURES)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"url\(|@import|<script|<link", page)


def test_report_contents(report_dir) -> None:
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    for text in (
        "AUC by missing rate",
        "DeLong tests against bd",
        "Cohort",
        "Provenance",
        "Resolved config",
        "numpy",
        "mask seeds",
        "class='best'",
    ):
        assert text in page, text
    markdown = (report_dir / "report.md").read_text(encoding="utf-8")
    for name in FIGURES:
        assert f"(figures/{name}.png)" in markdown
    assert "**" in markdown  # best values marked


@needs_chromium
def test_report_renders_offline_in_chromium(report_dir, tmp_path) -> None:
    page = report_dir / "report.html"
    result = open_page(CHROMIUM, page, tmp_path / "profile")
    # The page requested itself and its embedded images only: no network.
    external = [
        u for u in result.requests if u != page.resolve().as_uri() and not u.startswith("data:")
    ]
    assert external == []
    shot = Image.open(io.BytesIO(result.screenshot)).convert("RGB")
    assert shot.width == 1200 and shot.height > 2000
    images = {img["id"]: img for img in result.images}
    assert set(images) == {f"fig-{name}" for name in FIGURES}
    for name in FIGURES:
        img = images[f"fig-{name}"]
        with Image.open(report_dir / "figures" / f"{name}.png") as png:
            expected = png.size
        assert img["complete"] and (img["natural_width"], img["natural_height"]) == expected
        # Shown at its own size, or scaled down to the page width with its aspect ratio kept.
        assert img["width"] == pytest.approx(min(expected[0], img["width"]), abs=1)
        assert img["height"] == pytest.approx(img["width"] * expected[1] / expected[0], abs=2)
        assert img["width"] > 400
        box = (
            int(img["x"]),
            int(img["y"]),
            int(img["x"] + img["width"]),
            int(img["y"] + img["height"]),
        )
        pixels = np.asarray(shot.crop(box)).reshape(-1, 3)
        ink = np.mean(pixels.min(axis=1) < 200)  # share of non-white pixels: lines and text
        colours = len(np.unique(pixels[::7], axis=0))
        assert 0.02 < ink < 0.6, (name, ink)
        assert colours > 50, (name, colours)


@needs_chromium
def test_the_network_check_catches_an_external_resource(tmp_path) -> None:
    page = tmp_path / "leaky.html"
    page.write_text("<html><body><img src='http://example.invalid/x.png'></body></html>")
    result = open_page(CHROMIUM, page, tmp_path / "profile")
    assert "http://example.invalid/x.png" in result.requests
