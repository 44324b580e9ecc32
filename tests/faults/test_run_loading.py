"""Loading a trained run for prediction: a k-fold run stopped part way and damaged checkpoint
files are refused with one line that names what is wrong and how to fix it."""

from __future__ import annotations

import json
import re
import shlex
import shutil

import pandas as pd
import pytest

from bidistill.errors import CheckpointError
from bidistill.inference import load_run

from .conftest import Snapshot, assert_one_line_error, edit_config, invoke, small_cohort

pytestmark = pytest.mark.slow


def _kfold_cohort(folder):
    config = small_cohort(folder, methods=["wsi-only"])

    def kfold(raw):
        raw["cohort"]["splits"] = {"mode": "kfold", "folds": 3}

    return edit_config(config, kfold)


def _predict(run, features, out):
    return invoke("predict", "--run", run, "--features", features, "--out", out)


def test_a_kfold_run_stopped_after_one_fold_is_refused_until_finished(tmp_path):
    config = _kfold_cohort(tmp_path / "cohort")
    run = tmp_path / "run"
    features = config.parent / "features"
    assert invoke("run", config, "--out", run, "--no-progress").exit_code == 0
    full = tmp_path / "full.csv"
    assert _predict(run, features, full).exit_code == 0
    # Killed after fold 0: folds 1 and 2 never trained, the folds' predictions never joined.
    for name in ("folds/fold1", "folds/fold2", "wsi-only"):
        shutil.rmtree(run / name)

    with pytest.raises(CheckpointError, match=r"1 of 3 folds \(fold1, fold2 not finished\)"):
        load_run(run)
    out = tmp_path / "partial.csv"
    error = assert_one_line_error(_predict(run, features, out), "wsi-only", "1 of 3 folds")
    assert not out.exists()

    # The command the message gives finishes the run, as printed; the run then predicts what
    # the complete run predicted (same config and seed: same numbers).
    finish = re.search(r"`(bidistill run [^`]+)`", error).group(1)
    assert shlex.split(finish)[1:] == ["run", str(run / "config.yaml"), "--out", str(run)]
    finished = invoke(*shlex.split(finish)[1:])
    assert finished.exit_code == 0, finished.output
    assert len(load_run(run).folds) == 3
    assert _predict(run, features, out).exit_code == 0
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(full))


def test_a_fold_whose_training_stopped_midway_is_refused(tmp_path):
    """Weights saved but no predictions.csv (written last): the fold is not finished."""
    config = _kfold_cohort(tmp_path / "cohort")
    run = tmp_path / "run"
    assert invoke("run", config, "--out", run, "--no-progress").exit_code == 0
    (run / "folds" / "fold2" / "wsi-only" / "predictions.csv").unlink()
    with pytest.raises(CheckpointError, match=r"2 of 3 folds \(fold2 not finished\)"):
        load_run(run)


def test_a_holdout_method_whose_training_stopped_is_refused_with_the_finishing_command(
    run_copy, tmp_path
):
    _, run = run_copy
    (run / "wsi-only" / "predictions.csv").unlink()
    result = _predict(run, run.parent / "cohort" / "features", tmp_path / "p.csv")
    assert_one_line_error(
        result, "training did not finish", f"`bidistill run {run / 'config.yaml'} --out {run}`"
    )


def _garbage(path):
    path.write_bytes(b"\x00\x17 not what was saved \xff" * 10)


def _truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _not_json(path):
    path.write_text('{"columns": [', encoding="utf-8")


def _empty_object(path):
    path.write_text("{}", encoding="utf-8")


def _without(*keys):
    def edit(path):
        meta = json.loads(path.read_text(encoding="utf-8"))
        for key in keys:
            *parents, last = key.split(".")
            node = meta
            for parent in parents:
                node = node[parent]
            del node[last]
        path.write_text(json.dumps(meta), encoding="utf-8")

    return edit


@pytest.mark.parametrize(
    ("name", "damage", "says"),
    [
        ("model.safetensors", _garbage, "unreadable"),
        ("model.safetensors", _truncated, "unreadable"),
        ("clinical_encoder.json", _not_json, "unreadable"),
        ("clinical_encoder.json", _empty_object, "unreadable (no 'columns')"),
        ("model.json", _not_json, "not valid JSON"),
        ("model.json", _without("dims"), "lacks dims"),
        ("model.json", _without("dims.in_dim", "options"), "lacks options, dims.in_dim"),
    ],
    ids=[
        "weights-garbage",
        "weights-truncated",
        "encoder-not-json",
        "encoder-empty",
        "meta-not-json",
        "meta-without-dims",
        "meta-without-keys",
    ],  # fmt: skip
)
def test_a_damaged_checkpoint_file_is_named(run_copy, tmp_path, name, damage, says):
    _, run = run_copy
    damage(run / "wsi-only" / name)
    snapshot = Snapshot(run)
    with pytest.raises(CheckpointError, match=re.escape(f"{run / 'wsi-only' / name}: {says}")):
        load_run(run, "wsi-only")
    out = tmp_path / "p.csv"
    result = _predict(run, run.parent / "cohort" / "features", out)
    assert_one_line_error(
        result, str(run / "wsi-only" / name), says, "damaged", "delete the folder"
    )
    assert not out.exists()
    snapshot.assert_nothing_lost()
