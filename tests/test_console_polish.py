"""Console leftovers: output piped into a reader that stops early ends quietly, `next: bidistill
run` hints name a run folder the printed command may use, the results table keeps method names
and CIs whole at 80 columns, a tiny test set evaluates without numpy warnings, and counts take
the right number."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from bidistill._io import write_csv, write_text
from bidistill._text import count, every, verb
from bidistill.cli import app
from bidistill.evaluation import metrics as M
from bidistill.evaluation.evaluate import evaluate_run
from bidistill.synthetic.features import make_feature_cohort
from bidistill.synthetic.patches import make_patch_cohort

runner = CliRunner()


# --- a reader that closes the pipe early ----------------------------------------------------


@pytest.mark.parametrize("command", [["compare", "--help"], ["--help"], ["config", "CONFIG"]])
def test_output_into_a_closed_pipe_ends_quietly(tmp_path, command):
    """`bidistill ... | head`: the reader goes away; the command stops without a word, with the
    status a shell gives a program whose reader left (141), not as a bug."""
    config = make_feature_cohort(tmp_path / "c", patients=40, seed=0, dim=4, instances=(2, 4))
    command = [str(config) if word == "CONFIG" else word for word in command]
    process = subprocess.Popen(
        [sys.executable, "-m", "bidistill", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    process.stdout.close()  # the reader is gone before the first line is written
    errors = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141
    assert "BrokenPipe" not in errors and "bug" not in errors and "error" not in errors, errors
    assert "Exception ignored" not in errors, errors


# --- `next: bidistill run` hints and a run folder that another config made ---------------------


def _next_line(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stderr.strip().splitlines()[-1].removeprefix("next: ")


@pytest.mark.slow
def test_run_hints_avoid_a_run_folder_that_another_config_made(tmp_path, monkeypatch):
    """Two configs with the same `name:` in one folder: after the first ran in runs/<name>,
    `config`, `tile` and `extract` of the second print a `bidistill run` that runs as printed."""
    monkeypatch.chdir(tmp_path)
    end_to_end = make_patch_cohort(Path("cohort"), patients=12, seed=1)
    raw = yaml.safe_load(end_to_end.read_text())
    raw["methods"] = ["wsi-only"]
    raw["training"].update({"mode": "features", "epochs": 1})
    raw["evaluation"] = {"mask_seeds": 1, "bootstrap": 20}
    first, second = Path("cohort/first.yaml"), Path("cohort/second.yaml")
    first.write_text(yaml.safe_dump({**raw, "features": {**raw["features"], "dir": "f1"}}))
    second.write_text(yaml.safe_dump({**raw, "features": {**raw["features"], "dir": "f2"}}))
    taken = Path("runs") / raw["name"]
    assert runner.invoke(app, ["run", str(first), "--no-progress"]).exit_code == 0
    assert (taken / "metrics.csv").is_file()

    hints = [
        _next_line([command, str(config)])
        for command, config in [
            ("config", second),
            ("extract", second),
            ("config", end_to_end),
            ("tile", end_to_end),
        ]
    ]
    for hint, config in zip(hints, [second, second, end_to_end, end_to_end], strict=True):
        words = shlex.split(hint)
        assert words[:3] == ["bidistill", "run", str(config)], hint
        assert Path(words[words.index("--out") + 1]) == Path("runs") / config.stem, hint
    # The feature-mode hint, run as printed (the end-to-end one trains the same way).
    ran = runner.invoke(app, [*shlex.split(hints[1])[1:], "--no-progress"])
    assert ran.exit_code == 0, ran.output
    assert (Path("runs/second") / "metrics.csv").is_file()


# --- the results table at 80 columns, on a tiny test set -------------------------------------

LONG_LABEL = "bd-with-a-long-label"
TINY_CONFIG = f"""name: tiny
cohort:
  table: cohort.csv
  patient_column: id
  label: {{column: y, positive: ['1']}}
methods: [{{name: bd, label: {LONG_LABEL}}}, wsi-only]
evaluation: {{mask_seeds: 2, bootstrap: 50}}
"""


def _tiny_predictions(seed: int) -> pd.DataFrame:
    """7 test patients of whom 1 positive, 4 validation, 10 training."""
    labels = np.array([1, 0, 0, 0, 0, 0, 0] + [1, 1, 0, 0] + [1, 0] * 5)
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "patient_id": [f"P{i:02d}" for i in range(len(labels))],
            "split": ["test"] * 7 + ["val"] * 4 + ["train"] * 10,
            "fold": 0,
            "label": labels,
            "clinical_available": True,
            "prob_present": np.round(0.4 * labels + 0.6 * rng.random(len(labels)), 2),
            "prob_absent": np.round(rng.random(len(labels)), 2),
        }
    )


@pytest.fixture
def tiny_run(tmp_path) -> Path:
    run = tmp_path / "run"
    for seed, method in enumerate([LONG_LABEL, "wsi-only"]):
        write_csv(run / method / "predictions.csv", _tiny_predictions(seed))
    write_text(run / "config.yaml", TINY_CONFIG)
    return run


def test_the_results_table_keeps_names_and_cis_whole_at_80_columns(tiny_run):
    result = runner.invoke(app, ["evaluate", str(tiny_run)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), result.stdout
    assert "…" not in result.stdout, result.stdout
    rows = [line for line in lines if re.match(rf"({LONG_LABEL}|wsi-only) +\d\.\d{{3}}", line)]
    assert len(rows) == 4  # two tables of two methods
    bound = r"(\.\d\d|1\.00)"
    assert len(re.findall(rf"{bound}–{bound}", "\n".join(lines))) == 2 * 6  # every CI, whole
    headers = [line.split() for line in lines if line.startswith("method")]
    assert [r for h in headers for r in h[1:]] == ["r=0", "r=0.2", "r=0.4", "r=0.6", "r=0.8", "r=1"]
    # No line of spaces between the title and the table's header.
    title = next(i for i, line in enumerate(lines) if line.startswith("AUC on 7 test patients"))
    assert lines[title + 1].startswith("method"), result.stdout


# --- no numpy warnings on a tiny test set ------------------------------------------------------


def test_a_tiny_test_set_evaluates_without_numpy_warnings(tiny_run):
    """7 test patients, 1 positive: every statistic is computed where it is defined."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_run(tiny_run)
    metrics = pd.read_csv(tiny_run / "metrics.csv")
    assert metrics["auc_ci_low"].notna().all() and (metrics["n_positive"] == 1).all()


def test_statistics_undefined_on_a_class_of_one_or_none_are_nan_without_warnings():
    one_positive = np.array([1, 0, 0, 0, 0, 0, 0])
    no_positive = np.zeros(7, dtype=int)
    scores = np.random.default_rng(0).random((2, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # A variance needs two patients in each class: DeLong's has none with one positive.
        components = M.delong_components(scores, one_positive)
        assert np.isnan(components.covariance()).all()
        difference, z, p = M.delong_test(components, 0, 1)
        assert np.isfinite(difference) and np.isnan(z) and np.isnan(p)
        # With a class empty there is no AUC at all.
        assert np.isnan(M.permutation_test(scores[:1], scores[1:], no_positive).p_value)
        assert np.isnan(M.youden_threshold(no_positive, scores[0]))
        assert np.isnan(M.newcombe_ci(0.5, 0, 7)).all()
        kernels = M.pair_kernel(scores, no_positive)  # [2, 0, 7]
        assert np.isnan(M.bootstrap_auc(kernels, n_boot=10)).all()


# --- counts in the right number ------------------------------------------------------------------


def test_counts_agree_with_their_number():
    assert [count(1, "patch"), count(2, "patch")] == ["1 patch", "2 patches"]
    assert [every(1, "slide"), every(3, "slide")] == ["the slide", "all 3 slides"]
    assert [verb(1, "is", "are"), verb(0, "is", "are")] == ["is", "are"]
