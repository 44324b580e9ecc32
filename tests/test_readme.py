"""Every bidistill command the README shows exists, with the options it is shown with.

Each command line of the README's shell blocks (and of its inline code) is parsed by the real
CLI with `--help` appended: an unknown command or option fails, nothing runs. The walk-through
that runs on the demo is executed for real in tests/inference/test_readme_walkthrough.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bidistill.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [line.split(" #")[0].strip() for line in block.splitlines()]
    lines += re.findall(r"`((?:bidistill|torchrun) [^`\[|]*)`", text)
    commands = []
    for line in lines:
        words = shlex.split(line) if line else []
        if words[:1] == ["torchrun"] and "bidistill" in words:
            words = words[words.index("bidistill") :]
        if words[:1] == ["bidistill"] and len(words) > 1:
            commands.append(words[1:])
    return commands


def test_the_readme_shows_the_main_commands():
    shown = {words[0] for words in readme_commands()}
    assert {"init", "config", "tile", "run", "predict", "heatmap", "bcnb"} <= shown


@pytest.mark.parametrize("words", readme_commands(), ids=" ".join)
def test_each_readme_command_parses(words):
    result = CliRunner().invoke(app, [*words, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output or words == ["--version"]


def test_the_cheap_readme_commands_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for line in ("bidistill init -o exp.yaml", "bidistill config exp.yaml"):
        assert any(words == shlex.split(line)[1:] for words in readme_commands()), line
    init = runner.invoke(app, ["init", "-o", "exp.yaml"])
    assert init.exit_code == 0, init.output
    # The unedited template names a table that is not there yet: `config` says so and what
    # it blocks (exit 1), and the next command it prints is itself, after editing.
    check = runner.invoke(app, ["config", "exp.yaml"])
    assert check.exit_code == 1 and "Traceback" not in check.output
    assert "cohort.table" in check.output and "next: bidistill config exp.yaml" in check.output
