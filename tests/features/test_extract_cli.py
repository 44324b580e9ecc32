"""`bidistill extract` on a config: the command, its summary, and two torchrun processes (gloo,
CPU) writing the same files as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bidistill.cli import app
from bidistill.config import load_config
from bidistill.features import read_feature_file
from bidistill.slides import tile_from_config

from ..slides.helpers import tissue_image, write_pyramid_tiff

SLIDES = ["A", "B", "C", "D"]  # crc32 shards of 2: D is shard 0, A, B and C shard 1


def _write_config(root: Path, features_dir: str) -> Path:
    rows = ["patient,slide,label"] + [f"p{s},{s},{i % 2}" for i, s in enumerate(SLIDES)]
    (root / "cohort.csv").write_text("\n".join(rows) + "\n")
    config = {
        "cohort": {
            "table": "cohort.csv",
            "patient_column": "patient",
            "slide_column": "slide",
            "label": {"column": "label", "positive": ["1"]},
        },
        "slides": {"dir": "slides"},
        "tiling": {"coords_dir": "coords", "patch_size": 64, "mpp": 1.0, "qc": False},
        "features": {
            "dir": features_dir,
            "encoder": "timm:test_vit",
            "random_init": True,
            "batch_size": 3,
            "num_workers": 0,
        },
    }
    path = root / f"{features_dir}.yaml"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    (root / "slides").mkdir()
    for i, slide in enumerate(SLIDES):
        write_pyramid_tiff(
            root / "slides" / f"{slide}.tif", tissue_image(500, 600, seed=i)[0], mpp=0.5
        )
    tile_from_config(load_config(_write_config(root, "features")), progress=False)
    return root


def test_cli_extract_summarises_resumes_and_names_the_next_command(project):
    config = _write_config(project, "features")
    runner = CliRunner()
    result = runner.invoke(app, ["extract", str(config), "--no-progress"])
    output = " ".join(result.output.split())
    assert result.exit_code == 0, output
    assert "extracted 4 slides" in output and "0 failed" in output
    assert "RANDOM encoder weights" in output
    assert f"next: bidistill run {config} --out" in output
    assert sorted(p.stem for p in (project / "features").glob("*.h5")) == SLIDES

    result = runner.invoke(app, ["extract", str(config), "--no-progress"])
    assert "extracted 0 slides (0 patches), 4 already done" in " ".join(result.output.split())


def test_cli_extract_of_a_missing_slide_says_skip_errors_exists(project, tmp_path):
    config = json.loads(_write_config(project, "features").read_text())
    config["cohort"]["table"] = str(tmp_path / "cohort.csv")
    (tmp_path / "cohort.csv").write_text("patient,slide,label\npZ,Z,1\npA,A,0\n")
    config["slides"]["dir"] = str(project / "slides")
    config["tiling"]["coords_dir"] = str(project / "coords")
    config["features"]["dir"] = str(tmp_path / "features")
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["extract", str(path), "--no-progress"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1
    assert "no slide file for 'Z'" in output and "pass --skip-errors to go on" in output
    result = CliRunner().invoke(app, ["extract", str(path), "--no-progress", "--skip-errors"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1  # a slide failed, even though the others were extracted
    assert "extracted 1 slide" in output and output.count("no slide file for 'Z'") == 1


@pytest.mark.slow
def test_torchrun_with_two_processes_writes_the_same_files_as_one(project):
    single = _write_config(project, "features-single")
    CliRunner().invoke(app, ["extract", str(single), "--no-progress"])
    ranks = _write_config(project, "features-torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + ["-m", "bidistill", "extract", str(ranks), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 0, output
    assert output.count("extracted 4 slides") == 1  # rank 0 prints the merged summary
    shards = sorted(p.name for p in (project / "features-torchrun").glob("*.json"))
    assert shards == ["extraction_summary.shard0of2.json", "extraction_summary.shard1of2.json"]
    for slide in SLIDES:
        a = read_feature_file(project / "features-single" / f"{slide}.h5")
        b = read_feature_file(project / "features-torchrun" / f"{slide}.h5")
        np.testing.assert_array_equal(a.features, b.features)
        assert a.attrs == b.attrs
