"""The README's first walk-through, run as written on a run laid out as `make demo` lays it out
(a smaller cohort, so that it trains in seconds): its predict and heatmap commands and its
five-line Python example."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from bidistill.cli import app

README = Path(__file__).resolve().parents[2] / "README.md"
pytestmark = pytest.mark.slow


def walkthrough_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### 1. The demo") : text.index("### 2.")]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("bidistill ")]


def test_the_demo_walkthrough_commands_run_as_written(demo_root, monkeypatch):
    commands = walkthrough_commands()
    assert [shlex.split(c)[1] for c in commands] == ["predict", "heatmap"]
    monkeypatch.chdir(demo_root)
    for command in commands:
        result = CliRunner().invoke(app, shlex.split(command)[1:])
        assert result.exit_code == 0, (command, result.output)
    table = pd.read_csv("demo_run/new_patients.csv")
    assert len(table) == 120 and set(table["branch"]) == {"multi-modal", "single-modal"}
    # The heatmap drew P0003 as predict predicted it, every tile of its slide in its exports.
    drawn = pd.read_csv("demo_run/heatmaps/predictions.csv", dtype=str).set_index("patient_id")
    predicted = pd.read_csv("demo_run/new_patients.csv", dtype=str).set_index("patient_id")
    predicted = predicted.loc[["P0003"]]
    pd.testing.assert_frame_equal(drawn, predicted)
    tiles = pd.read_csv("demo_run/heatmaps/S0003.tiles.csv")
    assert len(tiles) == int(predicted["tiles"].iloc[0])
    assert tiles["attention"].sum() == pytest.approx(1, abs=1e-5)
    exported = json.loads(Path("demo_run/heatmaps/S0003.tiles.geojson").read_text())
    assert len(exported["features"]) == len(tiles)
    with Image.open("demo_run/heatmaps/S0003.heatmap.png") as png:
        assert png.width > 1000  # a panel per branch


def test_the_readme_python_example_runs(demo_root, monkeypatch):
    text = README.read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    monkeypatch.chdir(demo_root)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    assert "probability" in printed.getvalue() and "percentile" in printed.getvalue()
