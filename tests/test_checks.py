"""The run folder's record of the config file that made it (``experiment.checks``)."""

from __future__ import annotations

import shutil

import pytest

from bidistill.errors import ConfigError
from bidistill.experiment.checks import check_config_origin, record_config_origin


@pytest.fixture
def project(tmp_path):
    """project/exp.yaml and its run folder project/runs/exp, recorded."""
    folder = tmp_path / "project"
    (folder / "runs" / "exp").mkdir(parents=True)
    (folder / "exp.yaml").write_text("name: exp\n")
    record_config_origin(folder / "runs" / "exp", folder / "exp.yaml")
    return folder


def test_the_same_file_is_accepted_however_it_is_spelled(project, monkeypatch):
    monkeypatch.chdir(project)
    check_config_origin("runs/exp", "exp.yaml")
    check_config_origin(project / "runs" / "exp", project / "exp.yaml")


def test_a_copied_project_keeps_its_runs(project, tmp_path):
    copy = shutil.copytree(project, tmp_path / "copy")  # the original still exists
    check_config_origin(copy / "runs" / "exp", copy / "exp.yaml")


def test_another_config_file_that_exists_is_refused(project):
    other = project / "exp-copy.yaml"
    other.write_text("name: exp\n")
    with pytest.raises(ConfigError) as refused:
        check_config_origin(project / "runs" / "exp", other)
    message = str(refused.value)
    assert str(project / "exp.yaml") in message and str(other) in message
    assert f"--out {project / 'runs' / 'exp-copy'}" in message


def test_a_renamed_config_takes_the_folder_over(project):
    renamed = (project / "exp.yaml").rename(project / "final.yaml")
    check_config_origin(project / "runs" / "exp", renamed)
    record_config_origin(project / "runs" / "exp", renamed)
    (project / "exp.yaml").write_text("name: exp\n")  # a new file under the old name is another
    with pytest.raises(ConfigError):
        check_config_origin(project / "runs" / "exp", project / "exp.yaml")


def test_a_folder_without_a_record_is_accepted(tmp_path):
    (tmp_path / "old-run").mkdir()
    check_config_origin(tmp_path / "old-run", tmp_path / "any.yaml")
    check_config_origin(tmp_path / "not-made-yet", tmp_path / "any.yaml")
