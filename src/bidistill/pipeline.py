"""``bidistill run``: every stage of an experiment that is not done yet, in order.

resolve config -> load cohort -> ``splits.json`` -> train each method -> evaluate -> report.

Each stage is skipped when its outputs exist: a method whose ``<method>/predictions.csv`` exists
is trained already (``train_method`` writes that file last), and the evaluation is redone only
when a method's predictions or the config are newer than ``report.html``. So an interrupted run
continues where it stopped, and adding a method to the config trains only that method.

k-fold mode trains each fold into ``folds/fold<i>/<method>/`` and then joins the folds'
predictions into ``<method>/predictions.csv`` (with its ``fold`` column).

The optional train-time missingness grid (``evaluation.train_missing_rates``) trains every method
again with that share of the training patients stripped of all clinical data (nested, stratified
masks as at test time, mask seed 0), in ``train_missing/<rate>/``, evaluates each over the same
test rates, and writes ``train_missing.csv`` (one row per training rate, method and test rate).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bidistill._io import write_csv, write_json, write_text
from bidistill.config import ExperimentConfig, dump_config, load_config
from bidistill.errors import ConfigError

log = logging.getLogger(__name__)

# Sections that decide what a trained method is; a run directory refuses a config that changes
# them (methods may be added and evaluation settings changed: that only adds or redoes work).
FIXED_SECTIONS = ("cohort", "slides", "tiling", "features", "training")


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    metrics: pd.DataFrame
    trained: list[str]  # methods trained by this call (the others were done already)
    evaluated: bool  # False when the evaluation was up to date


def run_experiment(
    config_path: str | Path, out_dir: str | Path, *, progress: bool = True
) -> RunResult:
    """Run every stage of the experiment that is not done yet.

    Args:
        config_path: the experiment YAML.
        out_dir: the run directory (created when missing).
        progress: show progress bars while training.

    Side effects: writes the run directory of DESIGN.md (``config.yaml``, ``splits.json``,
    ``cohort.json``, one folder per method, the evaluation files, ``run.log``, ``run.json``).

    Raises:
        ConfigError: bad config, or ``out_dir`` holds a run of a config with other cohort,
            features or training settings.
        CohortError, FeatureFileError, PredictionsError: bad input files.
    """
    out_dir = Path(out_dir)
    config = load_config(config_path)
    from bidistill.models.registry import check_method_configs

    check_method_configs(config.methods, source=config_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = _add_file_log(out_dir / "run.log")
    started = time.time()
    try:
        _write_resolved_config(config, out_dir)
        log.info("run %s: config %s", out_dir, config_path)
        from bidistill.pixels import prepare_features

        prepare_features(config, out_dir, progress=progress)  # tile + extract what is missing
        from bidistill.cohort import load_cohort, resolve_splits

        cohort = load_cohort(config.cohort)
        splits = resolve_splits(cohort, config.cohort.splits, out_dir / "splits.json")
        _write_cohort_summary(out_dir, config, cohort)
        trainer = _Trainer(config, cohort, progress=progress)
        trained = trainer.train_all(out_dir, splits)
        evaluated = False
        if trained or not _evaluation_current(out_dir, config):
            _evaluate(out_dir, config, started)
            evaluated = True
        else:
            log.info("evaluation is up to date (report.html newer than every prediction)")
        if config.evaluation.train_missing_rates:
            trained += _train_missing_grid(out_dir, config, cohort, splits, trainer)
        metrics = pd.read_csv(out_dir / "metrics.csv")
        _write_run_info(out_dir, started, trained)
        return RunResult(run_dir=out_dir, metrics=metrics, trained=trained, evaluated=evaluated)
    except Exception as err:
        log.exception("run stopped")
        err.log_path = out_dir / "run.log"  # the CLI's error handler points the user there
        raise
    finally:
        logging.getLogger("bidistill").removeHandler(handler)
        handler.close()


def _add_file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    package_log = logging.getLogger("bidistill")
    package_log.addHandler(handler)
    package_log.setLevel(min(package_log.level or logging.INFO, logging.INFO))
    return handler


def _write_resolved_config(config: ExperimentConfig, out_dir: Path) -> None:
    target = out_dir / "config.yaml"
    text = dump_config(config)
    if target.is_file():
        previous = load_config(target)
        changed = [s for s in FIXED_SECTIONS if _section(previous, s) != _section(config, s)]
        if changed:
            raise ConfigError(
                f"{out_dir} holds a run made with other {', '.join(changed)} settings "
                f"(see {target}); use a new --out folder, or delete the folder to start over"
            )
        _check_method_options(previous, config, out_dir)
        if target.read_text(encoding="utf-8") == text:
            return  # unchanged: keep the file's time, so the evaluation stays current
    write_text(target, text)


def _check_method_options(previous: ExperimentConfig, config: ExperimentConfig, out_dir: Path):
    """Refuse a method entry whose options changed while its folder exists: the trained folder
    (skipped as done) would otherwise be reported under the new options."""
    before = {m.key: m.model_dump(mode="json") for m in previous.methods}
    for method in config.methods:
        old = before.get(method.key)
        if old is None or old == method.model_dump(mode="json"):
            continue
        folders = [out_dir / method.key, *out_dir.glob(f"folds/*/{method.key}")]
        folders += out_dir.glob(f"train_missing/*/{method.key}")
        if any(f.exists() for f in folders):
            raise ConfigError(
                f"{out_dir}: method '{method.key}' was trained with other options "
                f"({old}); give the new entry its own `label`, or delete {out_dir / method.key} "
                "to train it again"
            )


def _section(config: ExperimentConfig, name: str) -> Any:
    value = getattr(config, name)
    return value.model_dump(mode="json") if value is not None else None


def _write_cohort_summary(out_dir: Path, config: ExperimentConfig, cohort) -> None:
    """``cohort.json``: what the report says about the cohort beyond the per-split counts."""
    from bidistill.features.store import feature_dim, feature_path

    clinical = cohort.clinical_frame
    summary: dict[str, Any] = {
        "patients": int(len(cohort.patients)),
        "slides": int(len(cohort.slides)),
        "clinical_missing": {c: float(clinical[c].isna().mean()) for c in clinical.columns},
        "feature encoder": config.features.encoder,
    }
    if config.features.random_init:  # the report shows this as a banner
        from bidistill.pixels import RANDOM_FEATURES_WARNING

        summary["warning"] = RANDOM_FEATURES_WARNING
    if len(cohort.slides):
        first = feature_path(config.features.dir, str(cohort.slides["slide_id"].iloc[0]))
        if first.is_file():
            summary["feature dimension"] = feature_dim(first)
    write_json(out_dir / "cohort.json", summary)


class _Trainer:
    """Trains methods on one cohort, opening the feature files once and only when needed."""

    def __init__(self, config: ExperimentConfig, cohort, *, progress: bool) -> None:
        self.config, self.cohort, self.progress = config, cohort, progress
        self._store = None
        self.seconds: dict[str, float] = {}

    def store(self):
        if self._store is None:
            from bidistill.training import open_feature_store

            self._store = open_feature_store(self.config, self.cohort, progress=self.progress)
        return self._store

    def train_all(self, run_dir: Path, splits, cohort=None) -> list[str]:
        """Train every configured method not done in ``run_dir``; returns those trained."""
        trained = []
        for method_cfg in self.config.methods:
            if (run_dir / method_cfg.key / "predictions.csv").is_file():
                log.info("%s: done already, skipped", method_cfg.key)
                continue
            start = time.perf_counter()
            log.info("%s: training (%d fold(s))", method_cfg.key, len(splits.folds))
            self._train(method_cfg, run_dir, splits, cohort or self.cohort)
            self.seconds[f"{run_dir.name}/{method_cfg.key}"] = time.perf_counter() - start
            trained.append(method_cfg.key)
        return trained

    def _train(self, method_cfg, run_dir: Path, splits, cohort) -> None:
        from bidistill.training import train_method

        common = {
            "cohort": cohort,
            "splits": splits,
            "store": self.store(),
            "progress": self.progress,
        }
        if len(splits.folds) == 1:
            train_method(self.config, method_cfg, run_dir, fold=0, **common)
            return
        frames = []
        for fold in range(len(splits.folds)):
            fold_dir = run_dir / "folds" / f"fold{fold}"
            method_dir = train_method(self.config, method_cfg, fold_dir, fold=fold, **common)
            frames.append(pd.read_csv(method_dir / "predictions.csv", dtype={"patient_id": str}))
        write_csv(
            run_dir / method_cfg.key / "predictions.csv", pd.concat(frames, ignore_index=True)
        )


def _evaluation_current(out_dir: Path, config: ExperimentConfig) -> bool:
    report = out_dir / "report.html"
    if not report.is_file() or not (out_dir / "metrics.csv").is_file():
        return False
    inputs = [out_dir / "config.yaml"]
    inputs += [out_dir / m.key / "predictions.csv" for m in config.methods]
    return all(p.stat().st_mtime <= report.stat().st_mtime for p in inputs)


def _evaluate(out_dir: Path, config: ExperimentConfig, started: float) -> None:
    from bidistill.evaluation import evaluate_run

    log.info("evaluating %d methods", len(config.methods))
    evaluate_run(
        out_dir,
        config=config,
        provenance={
            "run started": datetime.fromtimestamp(started, timezone.utc).isoformat(
                timespec="seconds"
            ),
            "run time until evaluation (s)": round(time.time() - started, 1),
        },
    )


def _write_run_info(out_dir: Path, started: float, trained: list[str]) -> None:
    info_path = out_dir / "run.json"
    history = json.loads(info_path.read_text()).get("calls", []) if info_path.is_file() else []
    history.append(
        {
            "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.time() - started, 1),
            "trained": trained,
        }
    )
    write_json(info_path, {"calls": history})


# --- train-time missingness grid ----------------------------------------------------------------


def _train_missing_grid(
    out_dir: Path, config: ExperimentConfig, cohort, splits, trainer: _Trainer
) -> list[str]:
    from bidistill.evaluation import evaluate_run

    if len(splits.folds) > 1:
        raise ConfigError(
            "evaluation.train_missing_rates needs a holdout split (cohort.splits.mode other "
            "than kfold): in k-fold mode a training patient of one fold is a validation "
            "patient of another"
        )
    trained, rows = [], []
    for rate in config.evaluation.train_missing_rates:
        sub_dir = out_dir / "train_missing" / f"{rate:g}"
        sub_dir.mkdir(parents=True, exist_ok=True)
        # Rewritten only when changed: its time stamp tells whether the evaluation is current.
        text = dump_config(config)
        sub_config = sub_dir / "config.yaml"
        if not sub_config.is_file() or sub_config.read_text(encoding="utf-8") != text:
            write_text(sub_config, text)
        if not (sub_dir / "splits.json").is_file():
            splits.save(sub_dir / "splits.json")
        stripped = strip_training_clinical(cohort, splits, rate)
        done = trainer.train_all(sub_dir, splits, cohort=stripped)
        trained += [f"train_missing/{rate:g}/{m}" for m in done]
        if done or not _evaluation_current(sub_dir, config):
            evaluate_run(sub_dir, config=config)
        metrics = pd.read_csv(sub_dir / "metrics.csv")
        rows.append(metrics.assign(train_missing_rate=rate))
    table = pd.concat(rows, ignore_index=True)
    first = ["train_missing_rate", "method", "missing_rate"]
    write_csv(out_dir / "train_missing.csv", table[first + [c for c in table if c not in first]])
    return trained


def strip_training_clinical(cohort, splits, rate: float):
    """A copy of ``cohort`` in which a share ``rate`` of each fold's training patients has no
    clinical data (nested, label-stratified masks, mask seed 0; val and test untouched)."""
    from bidistill.evaluation.missing import nested_masks

    patients = cohort.patients.copy()
    features = cohort.feature_names
    for fold in splits.folds:
        ids = [str(p) for p in fold.train]
        rows = patients.loc[ids]
        available = rows[features].notna().any(axis=1).to_numpy()
        mask = nested_masks(ids, rows["label"].to_numpy(), available, [rate], [0])[0, 0]
        patients.loc[np.asarray(ids)[mask], features] = np.nan
    return dataclasses.replace(cohort, patients=patients)


# --- demo ---------------------------------------------------------------------------------------

DEMO_METHODS = ["bd", "wsi-only", "clinical-only", "fusion-mean", "moddrop"]


def run_demo(
    out_dir: str | Path, *, patients: int = 1058, seed: int = 0, progress: bool = True
) -> RunResult:
    """A synthetic feature cohort in ``out_dir/cohort`` and its full run in ``out_dir/run``.

    The cohort has as many patients as BCNB by default but small bags (64-dimensional features,
    30-120 instances per bag), so that training BD and four baselines and the full evaluation
    (6 rates x 10 mask seeds, 1000 bootstrap resamples) take under a minute on two CPU cores.
    Both steps resume.
    """
    import yaml

    from bidistill.synthetic.features import make_feature_cohort

    out_dir = Path(out_dir)
    config_path = out_dir / "cohort" / "config.yaml"
    if not config_path.is_file():
        log.info("making a synthetic cohort of %d patients in %s", patients, config_path.parent)
        make_feature_cohort(
            config_path.parent,
            patients=patients,
            seed=seed,
            dim=64,
            instances=(30, 120),
            progress=progress,
        )
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        raw["name"] = "demo"
        raw["methods"] = DEMO_METHODS
        write_text(
            config_path,
            "# `bidistill demo` config: a synthetic cohort, BD and baselines."
            "\n" + yaml.safe_dump(raw, sort_keys=False),
        )
    return run_experiment(config_path, out_dir / "run", progress=progress)
