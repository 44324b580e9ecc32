"""MLflow tracking of a real run, into a local file store."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from bidistill.errors import ConfigError
from bidistill.experiment import run_experiment
from bidistill.synthetic.features import make_feature_cohort

mlflow = pytest.importorskip(
    "mlflow", reason="MLflow is not installed (pip install 'bidistill[mlflow]')"
)


def _config(tmp_path):
    config = make_feature_cohort(tmp_path / "cohort", patients=60, dim=8, instances=(4, 8))
    raw = yaml.safe_load(config.read_text())
    raw["methods"] = ["bd", "wsi-only"]
    raw["training"].update(epochs=2, patience=2)
    raw["evaluation"] = {"mask_seeds": 2, "bootstrap": 50}
    raw["tracking"] = {"mlflow": "file:mlruns", "experiment": "tracking-test"}
    config.write_text(yaml.safe_dump(raw))
    return config


@pytest.mark.slow
def test_a_run_logs_params_epochs_metrics_and_report(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    config = _config(tmp_path)
    out = tmp_path / "run"
    run_experiment(config, out, progress=False)

    store = (tmp_path / "cohort" / "mlruns").resolve()  # relative to the config file
    assert store.is_dir()
    client = MlflowClient(tracking_uri=store.as_uri())
    state = json.loads((out / "tracking.json").read_text())
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tracking-test"
    assert run.data.params["training.epochs"] == "2"
    assert json.loads(run.data.params["methods"])[0]["name"] == "bd"
    history = client.get_metric_history(run.info.run_id, "bd/loss_total")
    assert [m.step for m in history] == [1, 2]
    assert "wsi-only/val_auc_absent" in run.data.metrics
    # The logged AUC at r = 0 is BD's on its test patients, each with the clinical data it has.
    test = pd.read_csv(out / "bd" / "predictions.csv").query("split == 'test'")
    routed = np.where(test["clinical_available"], test["prob_present"], test["prob_absent"])
    auc = roc_auc_score(test["label"], routed)
    assert run.data.metrics["test_auc/bd/r0"] == pytest.approx(auc, abs=1e-9)
    metrics = pd.read_csv(out / "metrics.csv").set_index(["method", "missing_rate"])
    for method in ("bd", "wsi-only"):
        for rate in (0.0, 1.0):
            logged = run.data.metrics[f"test_auc/{method}/r{rate:g}"]
            assert logged == pytest.approx(metrics.loc[(method, rate), "auc"], abs=1e-9)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "metrics.csv", "figures"} <= artifacts

    # A rerun (nothing to do) logs into the same MLflow run and duplicates nothing.
    run_experiment(config, out, progress=False)
    assert json.loads((out / "tracking.json").read_text()) == state
    again = client.get_metric_history(run.info.run_id, "bd/loss_total")
    assert [m.step for m in again] == [1, 2]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_tracking_without_mlflow_installed_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # import fails as if absent
    config = _config(tmp_path)
    with pytest.raises(ConfigError, match=r"pip install 'bidistill\[mlflow\]'"):
        run_experiment(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # stopped before making the run directory
