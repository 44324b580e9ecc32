"""The tiling stage over a cohort: outputs, QC images, resume, errors, parallel, the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bidistill.cli import app
from bidistill.config import TilingConfig
from bidistill.errors import SlideError
from bidistill.slides import SlideJob, read_coords, tile_cohort

from .helpers import tissue_image, write_jpeg, write_pyramid_tiff


@pytest.fixture
def slides_dir(tmp_path: Path, patch_folder: Path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    write_jpeg(folder / "A.jpg", tissue_image(900, 1200, seed=11)[0])
    write_pyramid_tiff(folder / "B.tif", tissue_image(1000, 1400, seed=12)[0], mpp=0.5)
    patch_folder.rename(folder / "C")
    return folder


def _jobs(folder: Path) -> list[SlideJob]:
    return [
        SlideJob("A", folder / "A.jpg", mpp=0.5),
        SlideJob("B", folder / "B.tif"),
        SlideJob("C", folder / "C"),
    ]


def _cfg(tmp_path: Path, **kw) -> TilingConfig:
    return TilingConfig(coords_dir=tmp_path / "coords", patch_size=64, mpp=1.0, **kw)


def test_tile_cohort_writes_coords_and_qc_then_resumes(tmp_path, slides_dir):
    cfg = _cfg(tmp_path)
    summary = tile_cohort(_jobs(slides_dir), cfg, progress=False)
    assert set(summary.done) == {"A", "B", "C"} and not summary.failed
    assert summary.done["A"] > 10 and summary.done["B"] > 10 and summary.done["C"] == 5
    coords_dir = tmp_path / "coords"
    a = read_coords(coords_dir / "A.h5")
    assert a.attrs["slide_mpp"] == 0.5 and a.patch_size_level0 == 128  # 64 px at 1 um/px
    assert (coords_dir / ".cache").is_dir()  # the JPEG's pyramidal cache
    c = read_coords(coords_dir / "C.h5")
    assert c.paths == [f"P7_{i:02d}.png" for i in range(5)]
    assert c.coords.tolist() == [[i, 0] for i in range(5)] and c.attrs["mask_kind"] == "patches"
    for slide_id in "ABC":
        qc = Image.open(coords_dir / "qc" / f"{slide_id}.png")
        assert min(qc.size) > 50
    qc_a = np.asarray(Image.open(coords_dir / "qc" / "A.png").convert("RGB")).astype(int)
    assert ((qc_a[..., 1] > 150) & (qc_a[..., 0] < 80) & (qc_a[..., 2] < 80)).any()  # mask edge
    assert json.loads((coords_dir / "tiling_summary.json").read_text())["done"]["C"] == 5

    # Rerun: everything is done. Remove B (as if a kill had stopped the run before B was
    # written): only B is tiled again, and A's file is left untouched.
    stamp = (coords_dir / "A.h5").stat().st_mtime_ns
    assert tile_cohort(_jobs(slides_dir), cfg, progress=False).skipped == ["A", "B", "C"]
    (coords_dir / "B.h5").unlink()
    again = tile_cohort(_jobs(slides_dir), cfg, progress=False)
    assert set(again.done) == {"B"} and again.skipped == ["A", "C"]
    assert (coords_dir / "A.h5").stat().st_mtime_ns == stamp


def test_a_kill_leaves_no_file_that_looks_done(tmp_path, slides_dir):
    # A kill during the write leaves only a hidden temporary, which is not a coords file.
    coords_dir = tmp_path / "coords"
    coords_dir.mkdir()
    (coords_dir / ".A.h5.x.tmp.h5").write_bytes(b"half")
    summary = tile_cohort(_jobs(slides_dir)[:1], _cfg(tmp_path), progress=False)
    assert summary.done.keys() == {"A"}


def _bad_jobs(tmp_path: Path, slides_dir: Path) -> list[SlideJob]:
    whole = (slides_dir / "A.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 3])
    (tmp_path / "text.svs").write_text("not a slide")
    return [
        SlideJob("cut", tmp_path / "cut.jpg", mpp=0.5),
        SlideJob("text", tmp_path / "text.svs"),
        SlideJob("gone", tmp_path / "gone.tif"),
        SlideJob("B", slides_dir / "B.tif"),
    ]


def test_bad_files_stop_the_run_or_are_summarised_with_skip_errors(tmp_path, slides_dir):
    jobs = _bad_jobs(tmp_path, slides_dir)
    with pytest.raises(SlideError, match=r"cut\.jpg: cannot decode image"):
        tile_cohort(jobs, _cfg(tmp_path), progress=False)
    summary = tile_cohort(jobs, _cfg(tmp_path), skip_errors=True, progress=False)
    assert set(summary.failed) == {"cut", "text", "gone"}
    assert "cut.jpg: cannot decode image" in summary.failed["cut"]
    assert "text.svs: not a slide OpenSlide can read" in summary.failed["text"]
    assert "gone.tif: slide file not found" in summary.failed["gone"]
    assert summary.done.keys() == {"B"}
    assert not (tmp_path / "coords" / "cut.h5").exists()


def test_parallel_workers_give_the_same_coords(tmp_path, slides_dir):
    serial = _cfg(tmp_path / "serial")
    parallel = _cfg(tmp_path / "parallel")
    tile_cohort(_jobs(slides_dir)[:2], serial, progress=False)
    summary = tile_cohort(_jobs(slides_dir)[:2], parallel, workers=2, progress=False)
    assert summary.done.keys() == {"A", "B"}
    for slide_id in "AB":
        np.testing.assert_array_equal(
            read_coords(serial.coords_dir / f"{slide_id}.h5").coords,
            read_coords(parallel.coords_dir / f"{slide_id}.h5").coords,
        )


def _write_cohort_config(tmp_path: Path, slides_dir: Path, slide_ids: list[str]) -> Path:
    rows = ["patient,slide,aln,scan_mpp"]  # a per-slide MPP for A only
    rows += [
        f"p{s},{s},{'N+' if i % 2 else 'N0'},{'0.25' if s == 'A' else ''}"
        for i, s in enumerate(slide_ids)
    ]
    (tmp_path / "cohort.csv").write_text("\n".join(rows) + "\n")
    config = {
        "cohort": {
            "table": "cohort.csv",
            "patient_column": "patient",
            "slide_column": "slide",
            "label": {"column": "aln", "positive": ["N+"]},
        },
        "slides": {"dir": str(slides_dir), "mpp": 0.5, "mpp_column": "scan_mpp"},
        "tiling": {"coords_dir": "out/coords", "patch_size": 64, "mpp": 1.0},
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_cli_tile_with_skip_errors_summarises_failures(tmp_path, slides_dir):
    (slides_dir / "D.svs").write_text("not a slide")
    config = _write_cohort_config(tmp_path, slides_dir, ["A", "B", "C", "D", "E"])
    runner = CliRunner()
    result = runner.invoke(app, ["tile", str(config)])
    output = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 1
    assert "error:" in output and "slides: no slide file for 'E' (looked for E.<svs|" in output
    assert "Traceback" not in output
    (slides_dir / "E.png").write_bytes(b"")  # now E exists, but is an empty file

    result = runner.invoke(app, ["tile", str(config), "--skip-errors"])
    assert result.exit_code == 1, result.output  # the others are tiled, but two slides failed
    output = " ".join(result.output.split())
    assert "2 slides failed" in output
    assert output.count("D.svs: not a slide OpenSlide can read") == 1  # printed once
    assert output.count("E.png: not a readable image") == 1
    assert "remove them from the cohort table first next: bidistill extract" in output
    coords = tmp_path / "out" / "coords"
    assert sorted(p.name for p in coords.glob("*.h5")) == ["A.h5", "B.h5", "C.h5"]
    assert read_coords(coords / "A.h5").attrs["slide_mpp"] == 0.25  # slides.mpp_column

    result = runner.invoke(app, ["tile", str(config), "--skip-errors"])
    assert "3 already done" in " ".join(result.output.split())


def test_cli_tile_on_a_synthetic_bcnb_folder(tmp_path):
    from bidistill.cohort.bcnb import prepare_bcnb
    from bidistill.synthetic.bcnb import make_bcnb_folder

    root = make_bcnb_folder(
        tmp_path / "BCNB", patients=10, seed=0, slide_size=(1024, 768), progress=False
    )
    report = prepare_bcnb(root, tmp_path / "prepared")
    with report.config_path.open("a") as config:  # small tiles for these small slides
        config.write("tiling:\n  patch_size: 64\n")
    result = CliRunner().invoke(app, ["tile", str(report.config_path), "--workers", "1"])
    assert result.exit_code == 0, result.output
    coords_dir = tmp_path / "prepared" / "coords"
    files = sorted(coords_dir.glob("*.h5"))
    assert len(files) == 10
    for path in files:
        tiles = read_coords(path)
        assert tiles.attrs["mask_kind"] == "annotations"  # the BCNB JSON polygons
        assert tiles.attrs["slide_mpp"] == 0.5  # slides.mpp: the JPEGs carry none
        assert len(tiles.coords) > 0
        assert (coords_dir / "qc" / f"{path.stem}.png").is_file()
    assert os.listdir(coords_dir / ".cache")
    assert (coords_dir / "qc" / "overview.png").is_file()
    assert "cohort overview" in result.output


def test_cli_tile_a_truncated_jpeg_names_skip_errors_and_reports_the_cache(tmp_path, slides_dir):
    whole = (slides_dir / "A.jpg").read_bytes()
    (slides_dir / "D.jpg").write_bytes(whole[: len(whole) // 3])
    config = _write_cohort_config(tmp_path, slides_dir, ["A", "D"])
    runner = CliRunner()
    result = runner.invoke(app, ["tile", str(config)])
    output = " ".join(result.output.split())
    assert result.exit_code == 1
    assert "D.jpg: cannot decode image" in output and "pass --skip-errors to go on" in output

    result = runner.invoke(app, ["tile", str(config), "--skip-errors"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1
    assert output.count("D.jpg: cannot decode image") == 1  # in the summary, once
    assert "1 already done, 1 failed" in output  # A was tiled by the first run
    cache = tmp_path / "out" / "coords" / ".cache"
    size_mb = sum(p.stat().st_size for p in cache.iterdir()) / 2**20
    assert f"converted once to tiled TIFFs: {round(size_mb, 1):g} MB in {cache}" in output
