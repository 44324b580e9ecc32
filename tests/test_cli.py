"""The command line through typer's runner and one real subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from bidistill.cli import app
from bidistill.config import load_config

runner = CliRunner()


def test_help_lists_every_command_with_examples():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("init", "config", "synth", "bcnb"):
        assert command in result.output
    for args in (["init"], ["config"], ["synth", "features"]):
        sub = runner.invoke(app, [*args, "--help"])
        assert sub.exit_code == 0 and "Example:" in sub.output, args


def test_init_writes_a_template_that_validates(tmp_path):
    out = tmp_path / "exp.yaml"
    result = runner.invoke(app, ["init", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert load_config(out).cohort.patient_column == "patient_id"
    again = runner.invoke(app, ["init", "-o", str(out)])
    assert again.exit_code == 1 and "--force" in again.output


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


def test_config_prints_resolved_config_or_a_clear_error(tmp_path):
    out = tmp_path / "exp.yaml"
    runner.invoke(app, ["init", "-o", str(out)])
    result = runner.invoke(app, ["config", str(out)])
    assert result.exit_code == 0 and str(tmp_path / "cohort.csv") in result.output
    out.write_text(out.read_text().replace("epochs: 40", "epoch: 40"))
    bad = runner.invoke(app, ["config", str(out)])
    assert bad.exit_code == 1
    assert "unknown key 'epoch' in section 'training'" in bad.output
    assert "Traceback" not in bad.output


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
    out.write_text(text.replace("lambda_kd: 0.5", "lambda_kdd: 0.5"))
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

    import bidistill.pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("a planted bug")

    monkeypatch.setattr(bidistill.pipeline, "run_experiment", broken)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    result = runner.invoke(app, ["run", str(tmp_path / "x.yaml"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "unexpected RuntimeError: a planted bug" in result.output
    (log_file,) = tmp_path.glob("bidistill-error-*.log")
    assert "Traceback" in log_file.read_text() and str(log_file) in result.output.replace("\n", "")
