"""The report as a reader sees it: the headline first, a banner for synthetic data, every figure
readable, opened in real headless Chromium (offline) at a desktop and a narrow width."""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bidistill._io import write_csv, write_text
from bidistill.evaluation import evaluate_run
from bidistill.evaluation.headline import format_p
from bidistill.evaluation.plots import method_colour
from bidistill.evaluation.run_info import synthetic_notice

from .chromium import chromium_binary, open_page
from .synthetic import write_run

NO_CHROMIUM = "Chromium is not installed (Debian: apt-get install chromium)"
METHODS = ["bd", "wsi-only", "fusion-zero", "clinical-only"]
FIGURES = (
    "auc_vs_missing",
    "roc_r0",
    "roc_r0.8",
    "roc_r1",
    "calibration_r0",
    "calibration_r1",
    "training_loss",
    "training_val_auc",
)


@pytest.fixture
def chromium() -> str:
    """The Chromium binary. Without one these tests skip with the reason, except in CI (the
    environment variable CI set), where they fail: the only test that renders the report must
    not drop out of CI unseen."""
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{NO_CHROMIUM}; CI renders the report, so it needs one", pytrace=False)
        pytest.skip(NO_CHROMIUM)
    return binary


def _config(name: str, encoder: str, methods=METHODS) -> str:
    return "\n".join(
        [
            f"name: {name}",
            "cohort:",
            "  table: cohort.csv",
            "  patient_column: id",
            "  label: {column: y, positive: ['1'], negative: ['0']}",
            f"features: {{encoder: {encoder}}}",
            f"methods: [{', '.join(methods)}]",
            "evaluation: {mask_seeds: 3, bootstrap: 200}",
            "",
        ]
    )


def _train_logs(run, methods) -> None:
    """Training logs as the training stage writes them: a loss falling, a validation AUC rising
    to a peak, one row per epoch."""
    for i, method in enumerate(methods):
        epochs = 12 + 3 * i
        t = np.arange(epochs)
        write_csv(
            run / method / "train_log.csv",
            pd.DataFrame(
                {
                    "stage": "main",
                    "epoch": t,
                    "loss_total": 0.7 * np.exp(-t / 8) + 0.3,
                    "val_score": 0.8 - 0.002 * (t - 7) ** 2,
                }
            ),
        )


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("report"), n_patients=200)
    write_text(run / "config.yaml", _config("report-test", "synthetic"))
    _train_logs(run, METHODS)
    evaluate_run(run)
    return run


@pytest.fixture(scope="module")
def real_features_report(tmp_path_factory):
    """The same predictions under a real encoder's name, methods in another order."""
    methods = list(reversed(METHODS))
    run = write_run(tmp_path_factory.mktemp("real"), methods=methods, n_patients=200)
    write_text(run / "config.yaml", _config("real", "uni", methods))
    evaluate_run(run)
    return run


def test_html_references_nothing_outside_itself(report_dir) -> None:
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"#][^'"]*)""", page)
    assert len(sources) == len(FIGURES)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"url\(|@import|<script|<link", page)


def test_headline_box_opens_the_report(report_dir) -> None:
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    box = page[page.index("id='headline'") : page.index("</section>", page.index("id='headline'"))]
    assert page.index("id='headline'") < page.index("<h2")  # before any section
    metrics = pd.read_csv(report_dir / "metrics.csv")
    delong = pd.read_csv(report_dir / "delong.csv")
    # What was compared, on how many patients.
    n = int(metrics["n_patients"].iloc[0])
    assert f"4 methods (bd, wsi-only, fusion-zero, clinical-only) on {n} test patients" in box
    # What won at which rates, with its AUC.
    best = metrics.loc[metrics.groupby("missing_rate")["auc"].idxmax()]
    for row in best.itertuples():
        assert f"{row.auc:.3f} [{row.auc_ci_low:.3f}, {row.auc_ci_high:.3f}]" in box
    # With the p-value of the lead at each rate: the winner against the runner-up when the
    # winner is the reference (bd), else the winner against bd.
    text = " ".join(re.sub(r"<[^>]+>", " ", box).split())
    for rate, rows in metrics.groupby("missing_rate"):
        ranked = rows.sort_values("auc", ascending=False)
        winner, runner_up = ranked["method"].iloc[0], ranked["method"].iloc[1]
        versus = runner_up if winner == "bd" else winner
        test = delong[(delong["missing_rate"] == rate) & (delong["method"] == versus)].iloc[0]
        difference = -test.auc_difference if winner == "bd" else test.auc_difference
        expected = f"{rate:g} {winner} " if winner != "bd" else f"{rate:g} bd "
        p_text = format_p(test.p_holm).replace("<", "&lt;")
        assert f"{expected}" in text and f"{difference:+.3f} {p_text}" in text, rate
    # Nowhere in the page a p-value in scientific notation or with six decimals.
    assert not re.search(r"p (?:=|&lt;) ?\d\.\d+e-\d|p = 0\.\d{4,}", page)


def test_synthetic_banner(report_dir, real_features_report) -> None:
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    assert page.index("id='synthetic-banner'") < page.index("id='headline'")
    assert "random vectors with a planted signal" in page
    assert "Synthetic data" in (report_dir / "report.md").read_text(encoding="utf-8")
    real = (real_features_report / "report.html").read_text(encoding="utf-8")
    assert "synthetic-banner" not in real


def test_banner_text_follows_the_feature_files_encoder() -> None:
    assert "Synthetic data" in synthetic_notice({"feature encoder": "synthetic"}, None)
    random = synthetic_notice({"feature encoder": "resnet50-trunc-random-init"}, None)
    assert random.startswith("Random features") and "untrained" in random
    assert synthetic_notice({"feature encoder": "uni"}, None) is None


def test_report_sections(report_dir) -> None:
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    for text in (
        "AUC by missing rate",
        "ROC curves",
        "Calibration",
        "Training curves",
        "Confusion matrices at the chosen threshold",
        "All metrics",
        "Paired tests against bd",
        "Methods and their options",
        "Intended use and limitations",
        "Simulated missingness",
        "Provenance",
        "<details id='config'><summary>Resolved config",
        "class='best'",
    ):
        assert text in page, text
    # The metrics table is grouped by rate, one group per rate.
    assert page.count("clinical data withheld from") >= 6
    markdown = (report_dir / "report.md").read_text(encoding="utf-8")
    assert markdown.index("has the highest AUC") < markdown.index("## AUC by missing rate")
    for name in FIGURES:
        assert f"(figures/{name}.png)" in markdown


def test_method_colours_are_the_same_in_every_report(report_dir, real_features_report) -> None:
    assert method_colour("my-variant") == method_colour("my-variant")  # labels: from the name
    for run in (report_dir, real_features_report):
        page = (run / "report.html").read_text(encoding="utf-8")
        swatch = re.search(r"background:(#[0-9A-Fa-f]{6})'></span>bd<", page)
        assert swatch and swatch.group(1) == method_colour("bd")


@pytest.mark.parametrize("width", [1280, 820])
def test_report_reads_well_in_chromium(chromium, report_dir, tmp_path, width) -> None:
    page = report_dir / "report.html"
    result = open_page(
        chromium,
        page,
        tmp_path / "profile",
        width=width,
        element_ids=("headline", "synthetic-banner"),
    )
    # The page requested itself and its embedded images only: no network.
    external = [
        u for u in result.requests if u != page.resolve().as_uri() and not u.startswith("data:")
    ]
    assert external == []
    # Nothing sticks out sideways: wide tables scroll inside their own box.
    assert result.scroll_width <= width
    # The banner, then the headline box, in the first screenful and the full width.
    banner, headline = result.boxes["synthetic-banner"], result.boxes["headline"]
    assert banner["y"] < headline["y"] < 400
    assert "Synthetic data" in banner["text"]
    assert "has the highest AUC" in headline["text"] and "p =" in headline["text"]
    assert headline["width"] > 0.8 * (min(width, 1120) - 40)
    shot = Image.open(io.BytesIO(result.screenshot)).convert("RGB")
    assert shot.width == width and shot.height > 3000
    images = {img["id"]: img for img in result.images}
    assert set(images) == {f"fig-{name}" for name in FIGURES}
    for name in FIGURES:
        img = images[f"fig-{name}"]
        with Image.open(report_dir / "figures" / f"{name}.png") as png:
            expected = png.size
        assert img["complete"] and (img["natural_width"], img["natural_height"]) == expected
        # Scaled down (never up), aspect ratio kept, inside the page, large enough to read:
        # a panel's 10 pt text is 21 px in the file, so at least half of it must remain.
        assert img["width"] <= expected[0] + 0.5
        assert img["height"] == pytest.approx(img["width"] * expected[1] / expected[0], abs=2)
        assert img["x"] >= 0 and img["x"] + img["width"] <= width
        assert img["width"] >= 0.5 * expected[0] or name == "auc_vs_missing", (name, img)
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


def test_the_network_check_catches_an_external_resource(chromium, tmp_path) -> None:
    page = tmp_path / "leaky.html"
    page.write_text("<html><body><img src='http://example.invalid/x.png'></body></html>")
    result = open_page(chromium, page, tmp_path / "profile")
    assert "http://example.invalid/x.png" in result.requests
