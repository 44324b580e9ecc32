"""The experiment config: the shipped templates validate, and errors name key, section, file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bidistill.config import ExperimentConfig, dump_config, load_config, parse_config
from bidistill.errors import ConfigError
from bidistill.templates import template_text

MINIMAL = {
    "cohort": {
        "table": "cohort.csv",
        "patient_column": "pid",
        "label": {"column": "y", "positive": ["1"]},
    }
}


def write_yaml(tmp_path: Path, data) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_generic_template_validates_as_written(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(template_text())
    cfg = load_config(path)
    assert [m.name for m in cfg.methods][0] == "bd"
    assert cfg.methods[0].options == {}  # BD with its defaults
    # every section of the experiment file is present in the template, spelled as the model says
    raw = yaml.safe_load(template_text())
    assert set(raw) == set(ExperimentConfig.model_fields)
    # the stage sections list every key, so the template documents the whole schema
    for section in ("slides", "tiling", "features", "training", "evaluation"):
        model = ExperimentConfig.model_fields[section].annotation
        model = getattr(model, "__args__", (model,))[0]  # SlidesConfig | None
        assert set(raw[section]) == set(model.model_fields), section


def test_paths_are_relative_to_the_config_file(tmp_path):
    cfg = load_config(write_yaml(tmp_path, MINIMAL))
    assert cfg.cohort.table == tmp_path / "cohort.csv"
    assert cfg.features.dir == tmp_path / "features"


def test_method_names_and_option_mappings(tmp_path):
    data = {**MINIMAL, "methods": ["wsi-only", {"name": "bd", "lambda_kd": 1.0}]}
    cfg = load_config(write_yaml(tmp_path, data))
    assert [m.name for m in cfg.methods] == ["wsi-only", "bd"]
    assert cfg.methods[1].options == {"lambda_kd": 1.0}


def test_misspelt_key_names_key_section_file_and_suggests(tmp_path):
    data = {**MINIMAL, "training": {"epoch": 3}}
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(tmp_path, data))
    message = str(err.value)
    assert "exp.yaml" in message
    assert "unknown key 'epoch' in section 'training'" in message
    assert "Did you mean 'epochs'?" in message


def test_unknown_nested_key_in_a_list_item(tmp_path):
    data = {**MINIMAL}
    data["cohort"] = {
        **MINIMAL["cohort"],
        "clinical": [{"column": "a", "kind": "numeric", "kin": 1}],
    }
    with pytest.raises(ConfigError, match=r"unknown key 'kin' in section 'cohort.clinical.0'"):
        load_config(write_yaml(tmp_path, data))


def test_wrong_type_names_key_and_expected_type(tmp_path):
    data = {**MINIMAL, "training": {"epochs": "ten"}}
    with pytest.raises(ConfigError, match=r"'training.epochs': expected an integer, got 'ten'"):
        load_config(write_yaml(tmp_path, data))


def test_bad_choice_and_range(tmp_path):
    data = {**MINIMAL, "evaluation": {"missing_rates": [0, 1.5]}}
    with pytest.raises(ConfigError, match=r"evaluation.missing_rates.*\[0, 1\]"):
        load_config(write_yaml(tmp_path, data))
    data = {**MINIMAL, "cohort": {**MINIMAL["cohort"], "clinical": [{"column": "a", "kind": "x"}]}}
    with pytest.raises(ConfigError, match=r"cohort.clinical.0.kind"):
        load_config(write_yaml(tmp_path, data))


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required key 'cohort.patient_column'"):
        parse_config({"cohort": {"table": "t.csv", "label": {"column": "y", "positive": ["1"]}}})


def test_duplicate_methods_refused():
    with pytest.raises(ConfigError, match="methods listed more than once"):
        parse_config({**MINIMAL, "methods": ["bd", "bd"]})


def test_ordinal_needs_levels():
    data = {
        **MINIMAL,
        "cohort": {**MINIMAL["cohort"], "clinical": [{"column": "g", "kind": "ordinal"}]},
    }
    with pytest.raises(ConfigError, match="ordinal column 'g' needs 'categories'"):
        parse_config(data)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found.*bidistill init"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cohort: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: line 1, column 18: not valid YAML"):
        load_config(bad)


def test_dump_round_trips(tmp_path):
    cfg = load_config(write_yaml(tmp_path, MINIMAL))
    again = parse_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_one_method_twice_needs_labels():
    twice = [{"name": "bd"}, {"name": "bd", "prompt": "wsi"}]
    with pytest.raises(ConfigError, match="listed more than once.*'label'"):
        parse_config({**MINIMAL, "methods": twice})
    twice[1]["label"] = "bd-wsi"
    cfg = parse_config({**MINIMAL, "methods": twice})
    assert [m.key for m in cfg.methods] == ["bd", "bd-wsi"]
    assert cfg.methods[1].options == {"prompt": "wsi"}  # the label is not a method option
    with pytest.raises(ConfigError, match="label"):
        parse_config({**MINIMAL, "methods": [{"name": "bd", "label": "../x"}]})


def test_tiling_magnification_sets_the_target_mpp():
    cfg = parse_config({**MINIMAL, "tiling": {"magnification": 40}})
    assert cfg.tiling.mpp == pytest.approx(0.25)
    cfg = parse_config({**MINIMAL, "tiling": {"magnification": 20, "mpp": 0.5}})
    assert cfg.tiling.mpp == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="magnification 10 means mpp 1, but mpp is 0.5"):
        parse_config({**MINIMAL, "tiling": {"magnification": 10, "mpp": 0.5}})


def test_the_old_name_of_lr_warmup_epochs_still_loads(tmp_path):
    cfg = load_config(write_yaml(tmp_path, {**MINIMAL, "training": {"warmup_epochs": 3}}))
    assert cfg.training.lr_warmup_epochs == 3
    both = {**MINIMAL, "training": {"warmup_epochs": 3, "lr_warmup_epochs": 3}}
    with pytest.raises(ConfigError, match="lr_warmup_epochs only"):
        load_config(write_yaml(tmp_path, both))
