"""The first hour of a new user: the README's first-run commands, exactly as printed, in an empty
folder. Each command must succeed and end by printing the next command of the README."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from bidistill.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- new-user-path"


def readme_commands() -> list[str]:
    """The commands of the README's marked code block, comments stripped."""
    text = README.read_text(encoding="utf-8")
    block = text[text.index(MARKER) :]
    block = block[block.index("```bash\n") + len("```bash\n") :]
    block = block[: block.index("```")]
    commands = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [c for c in commands if c]


def test_the_readme_block_is_the_path_we_test():
    commands = readme_commands()
    assert [c.split()[:2] for c in commands] == [
        ["bidistill", "init"],
        ["bidistill", "config"],
        ["bidistill", "run"],
        ["bidistill", "predict"],
    ]


@pytest.mark.slow
def test_new_user_path_as_the_readme_prints_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    runner = CliRunner()
    for i, command in enumerate(commands):
        args = shlex.split(command)
        assert args[0] == "bidistill"
        result = runner.invoke(app, args[1:])
        assert result.exit_code == 0, f"{command}\n{result.output}"
        last = result.stderr.strip().splitlines()[-1]
        if i + 1 < len(commands):
            assert last == f"next: {commands[i + 1]}", command
        if args[1] == "run":
            run_output = result.stdout
    run_dir = Path(shlex.split(commands[2])[-1])
    # What the README promises: the results with their uncertainty, and a report that opens
    # with the headline under a synthetic-data banner; then predictions for every patient.
    assert "95% CI" in run_output and "not reliable" in run_output
    assert "60 test patients" in README.read_text(encoding="utf-8")  # quoted from this run
    assert "AUC on 60 test patients" in run_output
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert set(metrics["method"]) == {"bd", "wsi-only", "clinical-only", "fusion-mean", "moddrop"}
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert page.index("id='synthetic-banner'") < page.index("id='headline'") < page.index("<h2")
    predicted = pd.read_csv(run_dir / "new_patients.csv")
    assert len(predicted) == 300 and predicted["probability"].between(0, 1).all()


INSTALL_MARKER = "<!-- install-path"


def readme_install_lines() -> list[str]:
    """The README's install block, as a user would paste it (comments stripped)."""
    text = README.read_text(encoding="utf-8")
    block = text[text.index(INSTALL_MARKER) :]
    block = block[block.index("```bash\n") + len("```bash\n") :]
    return [line.split("  #")[0].strip() for line in block[: block.index("```")].splitlines()]


def test_the_readme_activates_the_venv_before_any_bidistill_command():
    lines = [line for line in readme_install_lines() if line]
    assert lines[0] == "make install"
    assert lines.index("source .venv/bin/activate") < lines.index("bidistill --help")


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("CI") and not os.environ.get("BIDISTILL_TEST_INSTALL"),
    reason="installs a fresh .venv (minutes, GBs): run in CI or with BIDISTILL_TEST_INSTALL=1",
)
def test_a_fresh_clone_types_the_readme_commands_as_printed(tmp_path):
    """`make install` in a fresh clone, then the README's lines in one shell, verbatim: no
    activation step that the README does not show."""
    repo = Path(__file__).resolve().parents[1]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # The shell of a new user: no virtual environment on PATH.
    path = os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
    env["PATH"] = os.pathsep.join(p for p in path if not (Path(p) / "activate").is_file())
    script = "\n".join(["set -e", *readme_install_lines(), *readme_commands()[:2]])
    done = subprocess.run(
        ["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "next: bidistill config first/exp.yaml" in done.stderr


def test_the_readme_says_how_to_install_the_cpu_build_of_pytorch():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("**A machine without a GPU.**") :]
    lines = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).splitlines()
    torch_line = next(i for i, line in enumerate(lines) if line.startswith("pip install torch"))
    assert lines[torch_line].endswith("--index-url https://download.pytorch.org/whl/cpu")
    assert torch_line < lines.index("pip install -e '.[dev]'")  # torch first: pip keeps it
