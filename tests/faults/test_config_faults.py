"""Bad configs and bad --out folders: one error line, exit 1, before anything is written."""

from __future__ import annotations

import pytest

from .conftest import (
    Snapshot,
    assert_one_line_error,
    edit_config,
    invoke,
    make_read_only,
    small_cohort,
)


def _set(section: str, key: str, value):
    def edit(raw):
        target = raw
        for part in section.split("."):
            target = target.setdefault(part, {})
        target[key] = value

    return edit


# (case, edit of the parsed YAML, fragments of the one error line)
BAD_VALUES = [
    ("epochs-true", _set("training", "epochs", True), ["'training.epochs'", "got true"]),
    ("lr-infinite", _set("training", "lr", float("inf")), ["'training.lr'", "finite"]),
    ("seed-2**63", _set("training", "seed", 2**63), ["'training.seed'", "4294967295"]),
    ("split-seed-negative", _set("cohort.splits", "seed", -1), ["'cohort.splits.seed'"]),
    ("rates-empty", _set("evaluation", "missing_rates", []), ["'evaluation.missing_rates'"]),
    (
        "reference-unknown",
        _set("evaluation", "reference_method", "bdd"),
        ["reference_method 'bdd' is not one of the methods"],
    ),
    ("threshold-true", _set("evaluation", "threshold", True), ["'evaluation.threshold'"]),
    ("mask-seeds-0", _set("evaluation", "mask_seeds", 0), ["'evaluation.mask_seeds'"]),
    ("device-name", _set("training", "device", "gpu"), ["'training.device'", "cuda:N"]),
    (
        "unlisted-without-negative",
        lambda raw: raw["cohort"]["label"].update(negative=None, unlisted="drop"),
        ["'unlisted: drop' needs 'negative'"],
    ),
    ("no-methods", lambda raw: raw.update(methods=[]), ["'methods'", "at least 1"]),
    ("unknown-key", _set("training", "epoch", 3), ["unknown key 'epoch'", "'epochs'"]),
    ("unknown-method", lambda raw: raw.update(methods=["wsi_only"]), ["'wsi-only'"]),
]


@pytest.mark.parametrize(
    "edit,fragments", [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES]
)
def test_bad_config_values_stop_run_before_any_work(tmp_path, edit, fragments):
    config = edit_config(small_cohort(tmp_path / "cohort"), edit)
    snapshot = Snapshot(tmp_path / "cohort")
    result = invoke("run", config, "--out", tmp_path / "run")
    assert_one_line_error(result, config.name, *fragments)
    assert not (tmp_path / "run").exists()  # nothing written
    snapshot.assert_nothing_lost()
    assert invoke("config", config).exit_code == 1  # `config` finds it too


# (case, raw file text, fragments)
BAD_FILES = [
    ("not-utf8", "name: caf\xe9\n".encode("latin-1"), ["line 1: not UTF-8 text (byte 0xe9)"]),
    (
        "duplicate-key",
        b"training:\n  epochs: 3\ntraining:\n  epochs: 4\n",
        ["line 3", "key 'training' appears twice (first on line 1)"],
    ),
    ("unsafe-tag", b"name: !!python/object/apply:os.system [ls]\n", ["could not determine"]),
    ("tab-indent", b"name:\n\tx: 1\n", ["line 2", "not valid YAML"]),
    ("not-a-mapping", b"- a\n- b\n", ["expected a mapping"]),
]


@pytest.mark.parametrize(
    "content,fragments", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_config_files(tmp_path, content, fragments):
    config = tmp_path / "exp.yaml"
    config.write_bytes(content)
    result = invoke("run", config, "--out", tmp_path / "run")
    assert_one_line_error(result, str(config), *fragments)
    assert not (tmp_path / "run").exists()


def test_cuda_without_a_gpu_fails_before_work(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    config = edit_config(small_cohort(tmp_path / "cohort"), _set("training", "device", "cuda"))
    result = invoke("run", config, "--out", tmp_path / "run")
    assert_one_line_error(result, "training.device: 'cuda'", "no usable CUDA GPU", "auto or cpu")
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file(tmp_path):
    config = small_cohort(tmp_path / "cohort")
    out = tmp_path / "results.txt"
    out.write_text("my notes\n")
    result = invoke("run", config, "--out", out)
    assert_one_line_error(result, f"--out {out}: is a file, not a folder")
    assert out.read_text() == "my notes\n"


def test_read_only_out_folder(tmp_path):
    config = small_cohort(tmp_path / "cohort")
    out = tmp_path / "run"
    out.mkdir()
    undo = make_read_only(out)
    try:
        result = invoke("run", config, "--out", out)
    finally:
        undo()
    assert_one_line_error(result, f"--out {out}: cannot write there")
    assert list(out.iterdir()) == []
