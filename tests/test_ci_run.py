"""``.ci/run`` stops with an error when it cannot install Chromium (the report test needs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_stops_when_chromium_cannot_be_installed(tmp_path):
    # A PATH without a browser whose apt-get fails as it does when the mirror is down; make
    # records that the suite was never started.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    for name, script in {
        "apt-get": 'echo "E: mirror down" >&2; exit 100',
        "make": f'echo "$@" >> {tmp_path / "make.log"}',
    }.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / name).chmod(0o755)
    result = subprocess.run(
        ["/bin/bash", str(ROOT / ".ci" / "run")],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "could not install chromium" in result.stderr
    assert not (tmp_path / "make.log").exists()
