"""The numbers the README quotes from a command come from that command: `make demo`'s table is
regenerated here by a real `bidistill demo` and compared line by line, and the walk-through's
`predict` line has the form predict prints (its counts are not quoted).

When the demo's numbers change on purpose, paste the new table from `bidistill demo` into the
README's block under "What it printed here"."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bidistill.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.slow


def block_after(marker: str, fence: str = "```\n") -> list[str]:
    text = README.read_text(encoding="utf-8")
    rest = text[text.index(marker) :]
    rest = rest[rest.index(fence) + len(fence) :]
    return [line.rstrip() for line in rest[: rest.index("```")].splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    """`make demo`'s command, as the Makefile runs it, in an empty folder."""
    root = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(app, ["demo", "--out", str(root / "demo_run")])
    assert result.exit_code == 0, result.output
    return root, result.stdout


def test_the_readme_demo_table_is_what_the_demo_prints(demo):
    _, printed = demo
    quoted = [line for line in block_after("What it printed here") if line]
    shown = [line.rstrip() for line in printed.splitlines() if line.strip()]
    assert quoted[0] in shown, printed
    start = shown.index(quoted[0])
    assert shown[start : start + len(quoted)] == quoted


def test_the_readme_predict_line_has_the_form_predict_prints(demo, monkeypatch):
    root, _ = demo
    monkeypatch.chdir(root)
    section = README.read_text(encoding="utf-8").split("### 1. The demo")[1]
    command = next(
        line for line in block_after("### 1. The demo", "```bash\n") if "bidistill predict" in line
    )
    result = CliRunner().invoke(app, shlex.split(command.split("  #")[0])[1:])
    assert result.exit_code == 0, result.output
    quoted = next(line for line in section.splitlines() if line.startswith("predicted "))
    pattern = re.escape(quoted).replace("…", r"\d+")
    assert re.fullmatch(pattern, result.stderr.splitlines()[-2].strip()), result.stderr
