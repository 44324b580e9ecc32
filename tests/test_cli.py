"""The command line through typer's runner and one real subprocess."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from bidistill.cli import app
from bidistill.config import load_config

runner = CliRunner()


COMMANDS = ("init", "config", "tile", "train", "run", "evaluate", "demo", "compare")
SUBCOMMANDS = [[c] for c in COMMANDS] + [["synth", "features"], ["synth", "bcnb"]]
SUBCOMMANDS += [["bcnb", "prepare"]]


def test_help_lists_every_command_with_examples():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in (*COMMANDS, "synth", "bcnb"):
        assert command in result.output
    for args in SUBCOMMANDS:
        sub = runner.invoke(app, [*args, "--help"])
        assert sub.exit_code == 0 and "Example:" in sub.output, args


@pytest.mark.parametrize("args", SUBCOMMANDS, ids=" ".join)
def test_help_has_no_artefacts(args, monkeypatch):
    """Plain metavars (CONFIG, DIR), no type labels on flags, every option explained, and
    paragraphs that wrap at the terminal's width rather than the docstring's."""
    monkeypatch.setenv("COLUMNS", "400")  # rich reads the width from here
    sub = runner.invoke(app, [*args, "--help"])
    text = sub.output
    assert not re.search(r"\{[a-z_]+\}|<bool>|<path>|<int|<float|<str>", text), text
    for line in text.splitlines():
        row = line.strip("│ ").strip()
        if row.startswith("--") or row.startswith("-"):
            # option name, maybe a metavar, then its help: more than two words in the row
            assert len(row.split()) > 2, f"{args}: option without help: {row!r}"
    # At 400 columns no paragraph of these docstrings is long enough to wrap, so a line that
    # ends mid-sentence (no full stop, colon or closing bracket) is a docstring line break.
    body = [line.strip() for line in text.splitlines() if line.strip() and "│" not in line]
    for line in body[1:]:
        if not line.startswith(("Usage:", "Example:", "╭", "╰")):
            assert line.endswith((".", ":", ")")), f"{args}: paragraph broken: {line!r}"


def test_usage_line_names_arguments_plainly():
    result = runner.invoke(app, ["run", "--help"])
    assert "Usage: bidistill run [OPTIONS] CONFIG" in result.output
    compare = runner.invoke(app, ["compare", "--help"])
    assert re.search(r"Usage: bidistill compare \[OPTIONS\] RUN\.\.\. *$", compare.output, re.M)


def test_version():
    from bidistill import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"bidistill {__version__}"


def test_init_writes_a_template_that_validates_and_says_what_to_fill_in(tmp_path):
    out = tmp_path / "exp.yaml"
    result = runner.invoke(app, ["init", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert load_config(out).cohort.patient_column == "patient_id"
    assert "cohort.table" in result.stderr and "not found" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"next: bidistill config {out}"
    again = runner.invoke(app, ["init", "-o", str(out)])
    assert again.exit_code == 1 and "--force" in again.output


def test_init_synthetic_runs_as_written(tmp_path):
    out = tmp_path / "first" / "exp.yaml"
    result = runner.invoke(app, ["init", "--synthetic", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out.parent / "cohort.csv").is_file() and (out.parent / "features").is_dir()
    assert not (out.parent / "config.yaml").exists()  # the template is the only config
    cfg = load_config(out)
    assert cfg.features.encoder == "synthetic" and cfg.slides is None
    assert "to fill in" not in result.stderr
    checked = runner.invoke(app, ["config", str(out)])
    assert checked.exit_code == 0, checked.output
    assert "missing" not in checked.stderr
    assert checked.stderr.strip().splitlines()[-1] == (
        f"next: bidistill run {out} --out runs/synthetic-example"
    )
    refused = runner.invoke(app, ["init", "--synthetic", "-o", str(out)])
    assert refused.exit_code == 1 and "cohort.csv" in refused.output


def test_init_bcnb_template_validates_and_refuses_leaking_columns(tmp_path):
    out = tmp_path / "bcnb.yaml"
    result = runner.invoke(app, ["init", "--bcnb", "-o", str(out)])
    assert result.exit_code == 0, result.output
    cfg = load_config(out)
    assert cfg.cohort.label.column == "ALN status"
    assert [c.feature_name for c in cfg.cohort.clinical] == [
        "age",
        "tumour_size",
        "er",
        "pr",
        "her2",
    ]
    assert {"Surgical", "Number of lymph node metastases"} <= set(cfg.cohort.leakage_columns)
    # It names the table `bcnb prepare` writes, and its header says one consistent thing.
    assert cfg.cohort.table == tmp_path / "cohort.csv"
    header = [line for line in out.read_text().splitlines() if line.startswith("#")][:6]
    text = " ".join(header)
    assert "bidistill init --bcnb" in text and "DIR/cohort.csv, the table" in text
    assert "Written by" not in out.read_text()


def test_next_hints_are_one_line_whatever_the_width(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    out = tmp_path / "a-rather-long-folder-name-for-a-synthetic-bcnb-download"
    result = runner.invoke(
        app,
        ["synth", "bcnb", "--out", str(out), "--patients", "10"]
        + ["--slide-width", "512", "--slide-height", "512"],
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("writing a synthetic BCNB folder of 10 patients")
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"next: bidistill bcnb prepare --root {out} --out {out}-cohort"
    prepared = runner.invoke(app, last.removeprefix("next: bidistill ").split())
    assert prepared.exit_code == 0, prepared.output
    config = f"{out}-cohort/config.yaml"
    assert prepared.stderr.strip().splitlines()[-1] == f"next: bidistill tile {config}"


def test_config_prints_resolved_config_or_a_clear_error(tmp_path):
    out = tmp_path / "exp.yaml"
    runner.invoke(app, ["init", "-o", str(out)])
    result = runner.invoke(app, ["config", str(out)])
    # The config is valid, but the files it names do not exist: printed, checked, exit 1.
    assert result.exit_code == 1
    assert str(tmp_path / "cohort.csv") in result.stdout
    assert "missing cohort.table" in " ".join(result.stderr.split())
    assert "every stage reads the cohort table" in " ".join(result.stderr.split())
    assert result.stderr.strip().splitlines()[-1].startswith(f"next: bidistill config {out}")
    out.write_text(out.read_text().replace("epochs: 40", "epoch: 40"))
    bad = runner.invoke(app, ["config", str(out)])
    assert bad.exit_code == 1
    assert "unknown key 'epoch' in section 'training'" in bad.output
    assert "Traceback" not in bad.output


def test_config_names_missing_columns_features_and_slides(tmp_path, synth_cohort):
    import shutil

    import yaml

    folder = tmp_path / "c"
    shutil.copytree(synth_cohort.parent, folder)
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    raw["cohort"]["clinical"].append({"column": "bmi", "kind": "numeric"})
    raw["slides"] = {"dir": "slides"}
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    slide = next((folder / "features").glob("*.h5"))
    slide.unlink()
    result = runner.invoke(app, ["config", str(folder / "config.yaml")])
    assert result.exit_code == 1
    err = " ".join(result.stderr.split())
    assert "missing cohort.clinical: column 'bmi' is not in cohort.csv" in err
    # With the column fixed: `run` would extract the missing feature file from the slides,
    # but the slides folder is not there, which blocks tiling and extraction.
    raw["cohort"]["clinical"].pop()
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["config", str(folder / "config.yaml")])
    err = " ".join(result.stderr.split())
    assert result.exit_code == 1
    assert re.search(rf"1 of \d+ slides has no feature file in {folder / 'features'}", err)
    assert slide.name in err and "`run` tiles and extracts them first" in err
    assert f"missing slides.dir: {folder / 'slides'} not found" in err
    assert "tile blocked by slides.dir" in err and "train ready" in err


def test_synth_features_makes_a_loadable_cohort(tmp_path):
    result = runner.invoke(
        app,
        [
            "synth",
            "features",
            "--out",
            str(tmp_path),
            "--patients",
            "30",
            "--dim",
            "8",
            "--min-instances",
            "5",
            "--max-instances",
            "9",
        ],
    )
    assert result.exit_code == 0, result.output
    from bidistill.cohort import load_cohort

    cohort = load_cohort(load_config(tmp_path / "config.yaml").cohort)
    assert len(cohort.patients) == 30


@pytest.mark.slow
def test_console_script_runs_in_a_subprocess(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bidistill", "init", "-o", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "x.yaml").is_file()


def test_config_checks_method_names_and_options_before_any_work(tmp_path):
    out = tmp_path / "exp.yaml"
    runner.invoke(app, ["init", "-o", str(out)])
    text = out.read_text()
    out.write_text(text.replace("  - bd\n", "  - {name: bd, lambda_kdd: 2.0}\n"))
    bad = runner.invoke(app, ["config", str(out)])
    assert bad.exit_code == 1
    assert "exp.yaml: methods: method 'bd': unknown option 'lambda_kdd'" in bad.output
    assert "did you mean 'lambda_kd'?" in bad.output
    out.write_text(text.replace("  - wsi-only\n", "  - wsi_only\n"))
    bad = runner.invoke(app, ["run", str(out), "--out", str(tmp_path / "run")])
    assert bad.exit_code == 1
    assert "unknown method 'wsi_only'. Did you mean 'wsi-only'?" in bad.output
    assert not (tmp_path / "run").exists()  # nothing written before the config is checked


def test_bad_input_is_one_line_and_a_bug_names_its_log(tmp_path, monkeypatch):
    missing = runner.invoke(app, ["config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1
    assert missing.output.strip().splitlines() == [
        f"error: {tmp_path / 'nope.yaml'}: config file not found (make one with `bidistill init`)"
    ]
    assert "Traceback" not in missing.output

    import bidistill.experiment

    def broken(*args, **kwargs):
        raise RuntimeError("a planted bug")

    monkeypatch.setattr(bidistill.experiment, "run_experiment", broken)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    result = runner.invoke(app, ["run", str(tmp_path / "x.yaml"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "unexpected RuntimeError: a planted bug" in result.output
    (log_file,) = tmp_path.glob("bidistill-error-*.log")
    assert "Traceback" in log_file.read_text() and str(log_file) in result.output.replace("\n", "")


def test_run_stops_before_making_the_run_directory_when_files_are_missing(tmp_path):
    config = tmp_path / "exp.yaml"
    runner.invoke(app, ["init", "-o", str(config)])
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "cohort.table" in result.output and "not found" in result.output
    assert f"bidistill config {config}" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()
