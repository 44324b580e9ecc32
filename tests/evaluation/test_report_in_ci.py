"""Without Chromium the report rendering tests fail in CI (CI set) and skip, saying why, elsewhere.

Runs one of them in a pytest subprocess whose PATH is an empty folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TEST = "tests/evaluation/test_report.py::test_the_network_check_catches_an_external_resource"
ROOT = Path(__file__).resolve().parents[2]


def _run_without_chromium(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    empty = tmp_path / "no-browser"  # the interpreter runs by its full path; nothing else is needed
    empty.mkdir()
    env["PATH"] = str(empty)
    if ci:
        env["CI"] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:randomly", "-n", "0"]
    command += ["-p", "no:cacheprovider", "--basetemp", str(tmp_path / "base"), TEST]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("ci", [True, False], ids=["in-ci", "local"])
def test_a_missing_chromium_fails_in_ci_and_skips_locally(tmp_path, ci):
    result = _run_without_chromium(tmp_path, ci)
    output = result.stdout + result.stderr
    assert "Chromium is not installed (Debian: apt-get install chromium)" in output, output
    if ci:
        assert result.returncode == 1, output  # a fixture's failure: reported as an error
        assert "CI renders the report" in output and "skipped" not in output, output
    else:
        assert result.returncode == 0, output
        assert "1 skipped" in output, output
