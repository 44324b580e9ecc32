"""Optional experiment tracking: one MLflow run per run directory (what it logs:
docs/internal-interfaces.md). A resumed `run` logs into the same MLflow run, only what it has not
logged before (tags record which methods and which evaluation were logged).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd

from bidistill._io import write_json
from bidistill.config import ExperimentConfig
from bidistill.errors import ConfigError
from bidistill.runs.rundir import RunDir

log = logging.getLogger(__name__)

BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
MAX_PARAM = 500  # characters of a param value (MLflow's limit in older servers)


def require_mlflow() -> None:
    try:
        import mlflow.tracking  # noqa: F401
    except ImportError:
        raise ConfigError(
            "tracking.mlflow is set but MLflow is not installed: "
            "pip install 'bidistill[mlflow]' (or remove tracking.mlflow)"
        ) from None


class NoTracker:
    def sync(self) -> None:
        pass

    def finish(self, ok: bool) -> None:
        pass


def open_tracker(config: ExperimentConfig, run_dir: Path) -> NoTracker | MlflowTracker:
    if not config.tracking.mlflow:
        return NoTracker()
    return MlflowTracker(config, run_dir)


class MlflowTracker:
    def __init__(self, config: ExperimentConfig, run_dir: Path) -> None:
        require_mlflow()
        from mlflow.tracking import MlflowClient

        uri = config.tracking.mlflow
        if urlparse(uri).scheme == "file":
            # MLflow 3 keeps its file store only for those who ask for it; a file: URI in the
            # config is that request.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.config, self.run, self.uri = config, RunDir(run_dir), uri
        self.client = MlflowClient(tracking_uri=uri)
        try:
            self.run_id = self._run_id()
        except Exception as err:  # MLflow raises its own and requests' errors
            raise ConfigError(f"tracking.mlflow: cannot log to {uri}: {err}") from err
        log.info("MLflow: logging to run %s at %s", self.run_id, uri)

    def _run_id(self) -> str:
        state_path = self.run.tracking
        if state_path.is_file():
            state = json.loads(state_path.read_text(encoding="utf-8"))
            if state.get("tracking_uri") == self.uri:
                run = self.client.get_run(state["mlflow_run_id"])
                if run.info.lifecycle_stage == "active":
                    self.client.update_run(run.info.run_id, status="RUNNING")
                    return run.info.run_id
        name = self.config.tracking.experiment or self.config.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name)
        )
        run = self.client.create_run(
            experiment_id,
            run_name=self.run.path.name,
            tags={"bidistill.run_dir": str(self.run.path.resolve())},
        )
        write_json(state_path, {"tracking_uri": self.uri, "mlflow_run_id": run.info.run_id})
        return run.info.run_id

    def sync(self) -> None:
        """Log whatever of the run directory is not in MLflow yet: params, the training logs
        of the methods that have trained, and the evaluation when it changed."""
        tags = self.client.get_run(self.run_id).data.tags
        self._log_params()
        for method in self.config.methods:
            folder = self.run.joined(method.key)
            trained = folder.done and folder.train_log.is_file()
            if trained and f"bidistill.logged.{method.key}" not in tags:
                self._log_training(method.key, pd.read_csv(folder.train_log))
                self.client.set_tag(self.run_id, f"bidistill.logged.{method.key}", "true")
        report = self.run.report
        if report.is_file():
            stamp = str(report.stat().st_mtime_ns)
            if tags.get("bidistill.logged.report") != stamp:
                self._log_evaluation()
                self.client.set_tag(self.run_id, "bidistill.logged.report", stamp)

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

    def _log_params(self) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        params = flatten(self.config.model_dump(mode="json"))
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            # MLflow params cannot change; a resumed run may change the evaluation settings.
            log.warning("MLflow: params changed since the first call, not logged: %s", changed)
        for start in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[start : start + 100])

    def _log_training(self, method: str, frame: pd.DataFrame) -> None:
        from mlflow.entities import Metric

        numeric = [
            c for c in frame.columns if c != "epoch" and pd.api.types.is_numeric_dtype(frame[c])
        ]
        metrics = [
            Metric(f"{method}/{column}", float(value), 0, step)
            for step, (_, row) in enumerate(frame.iterrows(), start=1)
            for column in numeric
            if pd.notna(value := row[column])
        ]
        self._log_metrics(metrics)

    def _log_evaluation(self) -> None:
        from mlflow.entities import Metric

        table = pd.read_csv(self.run.metrics)
        metrics = []
        for row in table.itertuples():
            for column in ("auc", "auc_ci_low", "auc_ci_high"):
                value = getattr(row, column)
                if pd.notna(value):
                    key = f"test_{column}/{row.method}/r{row.missing_rate:g}"
                    metrics.append(Metric(key, float(value), 0, 0))
        self._log_metrics(metrics)
        run = self.run
        for path in (run.report, run.report_markdown, run.metrics, run.delong):
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        if run.figures.is_dir():
            self.client.log_artifacts(self.run_id, str(run.figures), run.figures.name)

    def _log_metrics(self, metrics: list) -> None:
        for start in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + BATCH])


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as ``section.key: text`` params (lists of mappings as their JSON)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    text = data if isinstance(data, str) else json.dumps(data)
    out[prefix.rstrip(".")] = text[:MAX_PARAM]
    return out
