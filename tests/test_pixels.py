"""`bidistill run` from pixels: a config that starts from slides tiles, extracts, trains and
evaluates; a rerun skips every stage; features of another kind are refused."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from bidistill.cli import app
from bidistill.errors import FeatureFileError
from bidistill.experiment import run_experiment

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def slides_config(tmp_path):
    from bidistill.cohort.bcnb import prepare_bcnb
    from bidistill.synthetic.bcnb import make_bcnb_folder

    root = make_bcnb_folder(
        tmp_path / "BCNB", patients=12, seed=0, slide_size=(512, 512), progress=False
    )
    config = prepare_bcnb(root, tmp_path / "exp").config_path
    raw = yaml.safe_load(config.read_text())
    # Slides this small are crossed by the pathologist's pen circles everywhere; tiles with ink
    # would all be dropped (tests/slides covers that), so this fixture keeps them.
    raw["tiling"] = {"patch_size": 64, "mpp": 1.0, "qc": False, "remove_pen": False}
    raw["features"] = {
        "encoder": "timm:test_vit",
        "random_init": True,
        "batch_size": 16,
        "num_workers": 0,
    }
    raw["methods"] = ["bd"]
    raw["training"] = {"epochs": 2, "patience": 2, "batch_size": 8}
    raw["evaluation"] = {"mask_seeds": 2, "bootstrap": 20}
    config.write_text(yaml.safe_dump(raw))
    return config


def _stamps(folder):
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.h5"))}


@pytest.mark.slow
def test_run_from_slides_runs_every_stage_then_skips_them_all(slides_config, tmp_path):
    exp, out = slides_config.parent, tmp_path / "run"
    result = run_experiment(slides_config, out, progress=False)
    assert len(_stamps(exp / "coords")) == 12 and len(_stamps(exp / "features")) == 12
    assert result.trained == ["bd"] and (out / "report.html").is_file()
    identity = json.loads((out / "bd" / "model.json").read_text())["features"]["identity"]
    assert identity["encoder"] == "timm:test_vit" and identity["random_init"] is True
    assert identity["patch_size"] == 64 and identity["mpp"] == 1.0
    assert len(identity["weights_sha256"]) == 16
    assert "the features come from a RANDOMLY INITIALISED encoder" in (
        (out / "report.html").read_text()
    )

    coords, features = _stamps(exp / "coords"), _stamps(exp / "features")
    again = run_experiment(slides_config, out, progress=False)
    assert again.trained == [] and not again.evaluated
    assert _stamps(exp / "coords") == coords and _stamps(exp / "features") == features

    # New patients from their slides alone: tiled and encoded with the run's own settings, the
    # test patients get the run's own predictions.
    new = tmp_path / "new"
    args = ["predict", "--run", out, "--slides", tmp_path / "BCNB" / "WSIs", "--clinical"]
    args += [exp / "cohort.csv", "--tiles", new, "--out", new / "pred.csv"]
    predicted = CliRunner().invoke(app, [str(a) for a in args])
    assert predicted.exit_code == 0, predicted.output
    assert len(_stamps(new)) == 12 and len(_stamps(new / "features")) == 12
    table = pd.read_csv(new / "pred.csv", dtype={"patient_id": str}).set_index("patient_id")
    run = pd.read_csv(out / "bd" / "predictions.csv", dtype={"patient_id": str})
    test = run[run["split"] == "test"].set_index("patient_id")
    np.testing.assert_allclose(
        table.loc[test.index, "probability"], test["prob_present"], atol=1e-5
    )
    # Its next line, as printed, maps what predict predicted (same slides, tiles, clinical data).
    chosen = ["--patient", str(test.index[0]), "--out", new / "one.csv"]
    one = CliRunner().invoke(app, [str(a) for a in [*args[:-2], *chosen]])
    assert one.exit_code == 0, one.output
    command = shlex.split(one.output.strip().splitlines()[-1].removeprefix("next: "))
    assert command[:2] == ["bidistill", "heatmap"] and "--clinical" in command, command
    maps = CliRunner().invoke(app, command[1:])
    assert maps.exit_code == 0, maps.output
    drawn = pd.read_csv(new / "heatmaps" / "predictions.csv", dtype={"patient_id": str})
    pd.testing.assert_frame_equal(drawn, pd.read_csv(new / "one.csv", dtype={"patient_id": str}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "X1.jpg").write_bytes(b"not a jpeg")
    args = ["predict", "--run", out, "--slides", broken / "X1.jpg", "--tiles", broken / "t"]
    refused = CliRunner().invoke(app, [str(a) for a in [*args, "--out", broken / "p.csv"]])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    message = " ".join(refused.output.split())
    assert "X1.jpg" in message and "predict again" in message and "--skip-errors" not in message
    assert not (broken / "p.csv").exists()

    # Features re-extracted into the same folder with other weights: the run refuses them.
    for path in (exp / "features").glob("*.h5"):
        with h5py.File(path, "r+") as h5:
            h5.attrs["encoder_weights_sha256"] = "0123456789abcdef"
    with pytest.raises(FeatureFileError, match=r"features bd was trained on \(.*model\.json\)"):
        run_experiment(slides_config, out, progress=False)


@pytest.mark.slow
def test_the_slides_demo_trains_every_method_and_separates_no_class_perfectly(tmp_path):
    """`make demo-slides` as a user runs it: the multi-modal methods with all clinical data are
    at least level with the WSI-only model (within its CI), and no method reaches AUC 1.000."""
    result = CliRunner().invoke(app, ["demo", "--from-slides", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(tmp_path / "demo" / "run" / "metrics.csv")
    assert (metrics["auc"].round(3) < 1.0).all(), metrics[["method", "missing_rate", "auc"]]
    complete = metrics[metrics["missing_rate"] == 0].set_index("method")
    wsi = complete.loc["wsi-only"]
    floor = wsi["auc"] - (wsi["auc_ci_high"] - wsi["auc_ci_low"]) / 2
    for method in ("bd", "fusion-mean", "moddrop"):
        assert complete.loc[method, "auc"] >= floor, complete[["auc", "auc_ci_low"]]
    config = (tmp_path / "demo" / "cohort" / "config.yaml").read_text()
    assert "batch_size: 8" in config and "library default 16" in config  # said, not hidden
    # The README quotes this table: it must be what the demo prints.
    readme = README.read_text(encoding="utf-8")
    block = readme[readme.index("`make demo-slides` (`bidistill demo --from-slides`) runs") :]
    block = block[block.index("```\n") + 4 :]
    quoted = [line.rstrip() for line in block[: block.index("```")].splitlines() if line.strip()]
    shown = [line.rstrip() for line in result.stdout.splitlines() if line.strip()]
    assert quoted[0] in shown, result.stdout
    start = shown.index(quoted[0])
    assert shown[start : start + len(quoted)] == quoted, result.stdout
