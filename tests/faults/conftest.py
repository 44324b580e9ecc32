"""Fault tests: bad inputs and faults on small synthetic cohorts, through the real CLI.

Every bad input must end in exit status 1 with one ``error:`` line (no traceback), and must not
change any file that existed before the command (``Snapshot``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from bidistill.cli import app

runner = CliRunner()
# Files a failed command may touch: the log it appends to and the lock it held.
VOLATILE = {"run.log", "run.lock", "run.lock.json"}


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit 1, exactly one ``error:`` line holding every fragment, and no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


class Snapshot:
    """Digests of every file under some folders; ``unchanged()`` compares them again."""

    def __init__(self, *folders: Path):
        self.folders = folders
        self.before = self._take()

    def _take(self) -> dict[Path, str]:
        files = {}
        for folder in self.folders:
            for path in sorted(Path(folder).rglob("*")):
                if path.is_file() and path.name not in VOLATILE:
                    files[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return files

    def assert_nothing_lost(self) -> None:
        after = self._take()
        lost = [p for p in self.before if p not in after]
        changed = [p for p in self.before if p in after and after[p] != self.before[p]]
        assert not lost and not changed, f"lost {lost}, changed {changed}"


def edit_config(config: Path, edit) -> Path:
    raw = yaml.safe_load(config.read_text())
    edit(raw)
    config.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return config


def small_cohort(folder: Path, *, patients: int = 40, seed: int = 1, methods=None) -> Path:
    """A synthetic cohort small enough to train and evaluate in a few seconds."""
    from bidistill.synthetic.features import make_feature_cohort

    config = make_feature_cohort(
        folder, patients=patients, seed=seed, dim=8, instances=(4, 10), two_slide_share=0.0
    )

    def fast(raw):
        raw["methods"] = methods or ["wsi-only", "clinical-only"]
        raw["training"].update(epochs=1, patience=1, batch_size=8)
        raw["evaluation"] = {"mask_seeds": 2, "bootstrap": 20, "missing_rates": [0.0, 1.0]}

    return edit_config(config, fast)


def table(config: Path) -> pd.DataFrame:
    return pd.read_csv(config.parent / "cohort.csv", dtype=str, keep_default_na=False)


def slide_of_split(config: Path, split: str) -> str:
    rows = table(config)
    return str(rows.loc[rows["split"] == split, "slide_id"].iloc[0])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished run of the small cohort: (config, run dir). Copy it before changing it."""
    base = tmp_path_factory.mktemp("trained")
    config = small_cohort(base / "cohort")
    result = invoke("run", config, "--out", base / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    return config, base / "run"


@pytest.fixture
def run_copy(trained_run, tmp_path) -> tuple[Path, Path]:
    """A private copy of the trained run and its cohort (file times kept): (config, run dir).

    The run's resolved config still names the original cohort's folder; a rerun with the
    copy's config is the same experiment in a moved folder.
    """
    config, run_dir = trained_run
    cohort = shutil.copytree(config.parent, tmp_path / "cohort")
    copied = shutil.copytree(run_dir, tmp_path / "run")
    return cohort / config.name, copied


def make_read_only(folder: Path):
    """Make ``folder`` unwritable even for root (``chattr +i``); returns an undo function."""
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip("running as root without chattr: cannot make a read-only folder")
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=False)
    folder.chmod(0o555)
    return lambda: folder.chmod(0o755)
